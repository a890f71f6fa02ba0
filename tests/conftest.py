import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from checkpoints import perturbed, random_state_dict, save_checkpoint  # noqa: E402

SCALES = (0.01, 0.03, 0.1)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, tmp_path):
    """No progress bars, a norm cache of the test's own (never the user's), an empty
    in-process memo before and after, and none of mergekit's loaders (it keeps one per
    model for the whole process), loader settings (LoRA cache folder, lazy unpickling) or
    cached architectures: no test leans on what another read, set or computed."""
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    from mergekit_metagpt import checkpoint_files, prepass

    def forget_loaders():
        LoaderCache().flush_all()
        LoaderCache.loaders.clear()
        LoaderCache().setup(MergeOptions())
        MergePlanner._model_arch.cache_clear()
        checkpoint_files._meta_shard.cache_clear()
        raw = sys.modules.get("mergekit.scripts.merge_raw_pytorch")  # mergekit-pytorch's own, if imported
        if raw is not None and raw.SimpleLoaderCache._instance is not None:
            for loader in raw.SimpleLoaderCache._instance.loaders.values():
                loader.flush()
            raw.SimpleLoaderCache._instance.loaders.clear()

    monkeypatch.setenv("MERGEKIT_METAGPT_PROGRESS", "0")
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE_DIR", str(tmp_path / "norm-cache"))
    prepass.clear_memo()
    forget_loaders()
    yield
    prepass.clear_memo()
    forget_loaders()


#: Each model's noise is scaled per tensor by one of these, in a cycle shifted per model:
#: λ over a part of the model (one layer, the embeddings) then differ from the global λ,
#: so that a pre-pass reading too few or too many tensors shows in λ.
PART_FACTORS = (1.0, 2.0, 4.0)


def _family(root, dtype, scales=SCALES, seed=0):
    base = random_state_dict(seed, dtype=dtype)
    paths = {"base": save_checkpoint(os.path.join(root, "base"), base)}
    sds = {"base": base}
    for i, scale in enumerate(scales):
        name = f"model{i}"
        noisy = perturbed(base, scale, seed=100 + i)
        sds[name] = {
            key: (base[key].float() + (noisy[key].float() - base[key].float())
                  * PART_FACTORS[(k + i) % len(PART_FACTORS)]).to(dtype)
            for k, key in enumerate(base)
        }
        paths[name] = save_checkpoint(os.path.join(root, name), sds[name])
    return paths, sds


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    """float32 base + three fine-tunes with noise scales 0.01, 0.03, 0.1, sharded."""
    return _family(str(tmp_path_factory.mktemp("fp32")), torch.float32)


@pytest.fixture(scope="session")
def llama_family_bf16(tmp_path_factory):
    return _family(str(tmp_path_factory.mktemp("bf16")), torch.bfloat16)


@pytest.fixture
def merge_options():
    from mergekit.options import MergeOptions

    return MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=True)
