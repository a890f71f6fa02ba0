"""A task vector's squared norm has the same bits however it is read: alone or beside other
models, with or without inner products, a chunk at a time or whole, on any number of
threads. The norm cache keeps one value per (base, model), so a norm whose last bits
depended on the way it was read would make λ depend on which recipe filled the cache."""

import itertools
import json
import os

import pytest
import torch

from merging import recipe, run_recipe
from mergekit.io.tasks import LoaderCache
from mergekit_metagpt import prepass
from mergekit_metagpt.norms import squared_delta, task_vector_sums
from mergekit_metagpt.scratch import CPU_CHUNK, Scratch

#: tensor sizes: part of a block, one block, one chunk, and two chunks with part of a
#: third and part of a block at its end
SIZES = (333, 1024, CPU_CHUNK, 2 * CPU_CHUNK + 5 * 1024 + 333)
#: the models' dtypes (the base's is the first's); "mixed": a float32 base and models of
#: four dtypes, one float64 (whose work makes the stack float64)
DTYPES = {
    "bfloat16": [torch.bfloat16] * 4,
    "float16": [torch.float16] * 4,
    "float32": [torch.float32] * 4,
    "float64": [torch.float64] * 4,
    "mixed": [torch.float32, torch.bfloat16, torch.float64, torch.float16],
}


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _tensors(size, dtypes):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(size, generator=gen) * 0.05
    # different scales, and a shared component so that inner products are far from zero
    shared = torch.randn(size, generator=gen)
    models = [(base + (shared + torch.randn(size, generator=gen)) * s).to(dtype)
              for s, dtype in zip((0.01, 0.03, 0.1, 0.3), dtypes)]
    return base.to(dtypes[0]), models


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtypes", sorted(DTYPES))
def test_a_norm_has_the_same_bits_however_it_is_summed(size, dtypes, threads_restored):
    """Whole or chunk by chunk (`squared_delta` with or without a scratch: sparsified
    vectors, `merge_state_dicts`), alone or beside every subset of the others in any order,
    with or without inner products, on 1, 2 or 4 threads."""
    base, models = _tensors(size, DTYPES[dtypes])
    seen = {i: set() for i in range(len(models))}
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        for i, model in enumerate(models):
            seen[i].add(float(squared_delta(model, base)).hex())
            seen[i].add(float(squared_delta(model, base, scratch=Scratch())).hex())
        for count in range(1, len(models) + 1):
            for chosen in itertools.permutations(range(len(models)), count):
                tensors = [models[i] for i in chosen]
                pairs = list(itertools.combinations(range(count), 2))
                for with_pairs in ({False, True} if pairs else {False}):
                    norms, _, _ = task_vector_sums(tensors, base, Scratch(), check_base=True,
                                                   pairs=pairs if with_pairs else ())
                    for i, value in zip(chosen, norms):
                        seen[i].add(float(value).hex())
    assert all(len(values) == 1 for values in seen.values()), seen
    for i, model in enumerate(models):  # and it is the norm
        exact = float((model.double() - base.double()).pow(2).sum())
        float64 = torch.float64 in (model.dtype, base.dtype)
        assert float.fromhex(seen[i].pop()) == pytest.approx(exact, rel=1e-12 if float64 else 1e-6)


def _lambdas(out):
    with open(os.path.join(out, "metagpt_coefficients.json")) as f:
        (entry,) = json.load(f)["merges"]
    return {row["model"]: (float(row["squared_norm"]).hex(), float(row["lambda"]).hex()) for row in entry["models"]}


def test_lambdas_and_weights_do_not_depend_on_what_filled_the_cache(llama_family, merge_options, tmp_path,
                                                                      monkeypatch):
    """Two models' merge, cold (their norms read beside each other, with inner products),
    equals, to the bit, the same merge after a cache filled by a run without inner products
    (each norm read alone), and by a recipe that read both models beside a float64
    checkpoint (no `dtype:`, so the float64 model's tensors are read as they are). Thread
    counts and the number of models stacked are the test above's: this fixture's tensors
    are too small to tell them apart."""
    from checkpoints import save_checkpoint

    paths, sds = llama_family
    paths = dict(paths, float64=save_checkpoint(str(tmp_path / "model2-float64"),
                                                {k: v.double() for k, v in sds["model2"].items()}))

    def no_dtype(models):
        config = recipe(paths, models)
        del config["dtype"]
        return config

    two = no_dtype(["model0", "model1"])

    def run(config, name, cache, **env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("MERGEKIT_METAGPT_CACHE_DIR", str(tmp_path / cache))
        prepass.clear_memo()
        LoaderCache().flush_all()
        out = str(tmp_path / name)
        weights = run_recipe(config, out, merge_options)
        for key in env:
            monkeypatch.delenv(key)
        return _lambdas(out), weights

    cold, cold_weights = run(two, "cold", "cold-cache")
    run(two, "fill-no-products", "no-products-cache", MERGEKIT_METAGPT_COSINES="0")
    run(no_dtype(["model0", "model1", "float64"]), "fill-float64", "float64-cache")
    for cache in ("no-products-cache", "float64-cache"):
        runs = prepass.STATS.runs
        warm, weights = run(two, f"warm-{cache}", cache)
        assert prepass.STATS.runs == runs  # all from the cache
        assert warm == cold, cache
        for name in cold_weights:
            assert torch.equal(weights[name], cold_weights[name]), (cache, name)
