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

# two chunks, a part of a third, and a part of a block at the end
SIZE = 2 * CPU_CHUNK + 5 * 1024 + 333


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _tensors(dtype):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(SIZE, generator=gen) * 0.05
    # different scales, and a shared component so that inner products are far from zero
    shared = torch.randn(SIZE, generator=gen)
    models = [(base + (shared + torch.randn(SIZE, generator=gen)) * s).to(dtype) for s in (0.01, 0.03, 0.1, 0.3)]
    return base.to(dtype), models


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_a_norm_has_the_same_bits_however_it_is_summed(dtype, threads_restored):
    base, models = _tensors(dtype)
    seen = {i: set() for i in range(len(models))}
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        for i, model in enumerate(models):
            seen[i].add(float(squared_delta(model, base)).hex())  # whole (sparsified vectors' path)
            seen[i].add(float(squared_delta(model, base, scratch=Scratch())).hex())  # merge_state_dicts'
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
        assert float.fromhex(seen[i].pop()) == pytest.approx(exact, rel=1e-6 if dtype != torch.float64 else 1e-12)


def _lambdas(out):
    with open(os.path.join(out, "metagpt_coefficients.json")) as f:
        (entry,) = json.load(f)["merges"]
    return {row["model"]: (float(row["squared_norm"]).hex(), float(row["lambda"]).hex()) for row in entry["models"]}


def test_lambdas_and_weights_do_not_depend_on_what_filled_the_cache(llama_family, merge_options, tmp_path,
                                                                      monkeypatch, threads_restored):
    """Two models' merge, cold (their norms read beside each other, with inner products),
    equals, to the bit, the same merge after a cache filled by a three-model recipe, by a
    run without inner products, and on one thread. (`merge_state_dicts`' norms are
    `squared_delta`'s, in the test above.)"""
    paths, _ = llama_family
    two = recipe(paths, ["model0", "model1"])

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

    threads = max(2, torch.get_num_threads())
    torch.set_num_threads(threads)
    cold, cold_weights = run(two, "cold", "cold-cache")
    run(recipe(paths, ["model0", "model1", "model2"]), "fill-3", "three-cache")
    run(two, "fill-no-products", "no-products-cache", MERGEKIT_METAGPT_COSINES="0")
    torch.set_num_threads(1)
    run(two, "fill-one-thread", "one-thread-cache")
    torch.set_num_threads(threads)
    for cache in ("three-cache", "no-products-cache", "one-thread-cache"):
        runs = prepass.STATS.runs
        warm, weights = run(two, f"warm-{cache}", cache)
        assert prepass.STATS.runs == runs  # from the cache, not read again
        assert warm == cold, cache
        for name in cold_weights:
            assert torch.equal(weights[name], cold_weights[name]), (cache, name)
