"""CUDA: the pre-pass on the GPU, matching the CPU merge. Skipped without a GPU."""

import pytest
import torch

from merging import recipe, run_recipe
from mergekit.io.tasks import LoaderCache
from mergekit_metagpt import prepass

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MODELS = ["model0", "model1", "model2"]


@pytest.mark.parametrize("read_to_gpu, low_cpu_memory", [(False, False), (True, False), (True, True)])
def test_cuda_merge_matches_cpu(read_to_gpu, low_cpu_memory, llama_family_bf16, tmp_path):
    from mergekit.options import MergeOptions

    paths, _ = llama_family_bf16
    config = recipe(paths, MODELS, dtype="bfloat16")
    cpu = run_recipe(config, str(tmp_path / "cpu"), MergeOptions(copy_tokenizer=False, quiet=True))
    prepass.clear_memo()
    LoaderCache().flush_all()
    torch.cuda.reset_peak_memory_stats()
    gpu = run_recipe(config, str(tmp_path / "gpu"), MergeOptions(
        copy_tokenizer=False, quiet=True, device="cuda", read_to_gpu=read_to_gpu, low_cpu_memory=low_cpu_memory,
    ))
    for name in cpu:
        assert torch.allclose(cpu[name].float(), gpu[name].float(), atol=1e-2, rtol=1e-2), name


def test_prepass_on_gpu_uses_a_few_tensors_of_memory(llama_family):
    from mergekit.common import ModelReference

    paths, sds = llama_family
    prepass.clear_memo()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    base = ModelReference.parse(paths["base"])
    models = [ModelReference.parse(paths[m]) for m in MODELS]
    norms = prepass.checkpoint_norms(base, models, torch.device("cuda"))
    peak = torch.cuda.max_memory_allocated() - start
    largest = max(t.numel() * 4 for t in sds["base"].values())
    model_bytes = sum(t.numel() * t.element_size() for t in sds["base"].values())
    assert peak <= 8 * largest + (1 << 20), (peak, largest)
    assert peak < 4 * model_bytes
    expected = sum(float((sds["model2"][k].double() - sds["base"][k].double()).pow(2).sum()) for k in sds["base"])
    assert abs(sum(norms[models[2]].values()) - expected) / expected < 1e-5
