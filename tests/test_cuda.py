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
def test_cuda_merge_matches_cpu(read_to_gpu, low_cpu_memory, llama_family_bf16, tmp_path, monkeypatch):
    from mergekit.options import MergeOptions

    # no norm cache, no memo: the GPU merge must run its own pre-pass, on the GPU
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    prepass.clear_memo()
    paths, _ = llama_family_bf16
    config = recipe(paths, MODELS, dtype="bfloat16")
    runs = prepass.STATS.runs
    cpu = run_recipe(config, str(tmp_path / "cpu"), MergeOptions(copy_tokenizer=False, quiet=True))
    assert prepass.STATS.runs == runs + 1 and prepass.STATS.devices[-1] == "cpu"
    LoaderCache().flush_all()
    torch.cuda.reset_peak_memory_stats()
    gpu = run_recipe(config, str(tmp_path / "gpu"), MergeOptions(
        copy_tokenizer=False, quiet=True, device="cuda", read_to_gpu=read_to_gpu, low_cpu_memory=low_cpu_memory,
    ))
    assert prepass.STATS.runs == runs + 2, "the GPU merge did not run its own pre-pass"
    assert prepass.STATS.devices[-1].startswith("cuda"), prepass.STATS.devices[-2:]
    for name in cpu:
        assert torch.allclose(cpu[name].float(), gpu[name].float(), atol=1e-2, rtol=1e-2), name


def planned_norms(paths, device):
    """The pre-pass of a planned recipe (as `mergekit-metagpt coefficients` runs it)."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_metagpt.planning import plan_recipe

    config = MergeConfiguration.model_validate(recipe(paths, MODELS))
    run = plan_recipe(config, MergeOptions(quiet=True))
    (set_norms,) = prepass.compute(run, torch.device(device)).sets
    return {str(model): norm for model, norm in set_norms.coefficients.squared_norms}


def test_prepass_on_gpu_uses_a_few_tensors_of_memory(llama_family, monkeypatch):
    from mergekit_metagpt.staging import PinnedStaging

    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    staged = []
    to_device = PinnedStaging.to_device
    monkeypatch.setattr(PinnedStaging, "to_device", lambda self, t: staged.append(t.nbytes) or to_device(self, t))
    paths, sds = llama_family
    prepass.clear_memo()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    runs = prepass.STATS.runs
    norms = planned_norms(paths, "cuda")
    assert prepass.STATS.runs == runs + 1 and prepass.STATS.devices[-1].startswith("cuda")
    peak = torch.cuda.max_memory_allocated() - start
    largest = max(t.numel() * 4 for t in sds["base"].values())
    model_bytes = sum(t.numel() * t.element_size() for t in sds["base"].values())
    assert peak <= 8 * largest + (1 << 20), (peak, largest)
    assert peak < 4 * model_bytes
    assert sum(staged) == 4 * model_bytes, "CPU-loaded tensors should reach the GPU through the pinned staging"
    expected = sum(float((sds["model2"][k].double() - sds["base"][k].double()).pow(2).sum()) for k in sds["base"])
    assert abs(norms[paths["model2"]] - expected) / expected < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64])
def test_pinned_staging_copies_exactly(dtype):
    """Tensors of many chunks, queued back to back through two small buffers (each
    reused while earlier transfers may still be in flight), arrive bit for bit."""
    from mergekit_metagpt.staging import PinnedStaging

    staging = PinnedStaging(torch.device("cuda"), chunk_bytes=1000, slots=2)
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randint(-1000, 1000, (n,), generator=generator).to(dtype) for n in (0, 1, 499, 5000, 123457)]
    tensors.append(torch.randn(300, 70, generator=generator).to(dtype).t())  # not contiguous
    moved = [staging.to_device(t) for t in tensors]
    staging.close()
    for tensor, out in zip(tensors, moved):
        assert out.device.type == "cuda" and out.dtype == tensor.dtype and out.shape == tensor.shape
        assert torch.equal(out.cpu(), tensor)


def test_inspect_on_gpu_matches_cpu(llama_family, tmp_path, monkeypatch):
    """Norms and inner products (cosines) computed on the GPU equal the CPU's."""
    import json

    from merging import write_yaml
    from mergekit_metagpt.cli import main

    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    paths, _ = llama_family
    config = write_yaml(recipe(paths, MODELS), str(tmp_path / "r.yml"))
    found = {}
    for device in ("cpu", "cuda"):
        prepass.clear_memo()
        flags = ["--cuda"] if device == "cuda" else []
        assert main(["inspect", config, str(tmp_path / device), "--no-pictures", *flags]) == 0
        with open(tmp_path / device / "metagpt-inspect.json") as f:
            (found[device],) = json.load(f)["merges"]
    assert prepass.STATS.devices[-1].startswith("cuda")
    cpu, gpu = found["cpu"], found["cuda"]
    for a, b in zip(cpu["squared_norms"], gpu["squared_norms"]):
        assert abs(a - b) <= 1e-5 * a
    for row_cpu, row_gpu in zip(cpu["cosine"], gpu["cosine"]):
        for a, b in zip(row_cpu, row_gpu):
            assert a is not None and abs(a - b) <= 1e-6
