"""metagpt_ties / metagpt_dare against mergekit's ties / dare_linear with weight = λ."""

import pytest
import torch

import mergekit_metagpt  # noqa: F401
from checkpoints import closed_form
from merging import recipe, run_recipe
from mergekit.io.tasks import LoaderCache

MODELS = ["model0", "model1", "model2"]


def stock_recipe(paths, method, lams, density, **params):
    config = recipe(paths, MODELS, method=method, parameters={"normalize": False, **params})
    config["models"] = [
        {"model": paths[m], "parameters": {"weight": lam, "density": density}} for m, lam in zip(MODELS, lams)
    ]
    return config


@pytest.mark.parametrize("ours, stock, extra", [
    ("metagpt_ties", "ties", {}),
    ("metagpt_dare", "dare_linear", {}),
    ("metagpt_ties", "ties", {"lambda": 0.6}),
    ("metagpt_dare", "dare_linear", {"lambda": 0.6}),
    ("metagpt_dare", "dare_linear", {"rescale": False}),
    # as copied from a ties recipe: normalize: false is what MetaGPT does, so it is accepted
    ("metagpt_ties", "ties", {"normalize": False}),
    # DARE's drop, then TIES's sign election: what a dare_ties recipe becomes
    ("metagpt_dare_ties", "dare_ties", {}),
    ("metagpt_dare_ties", "dare_ties", {"int8_mask": True, "rescale": False, "lambda": 0.6}),
], ids=["ties", "dare", "ties-lambda", "dare-lambda", "dare-no-rescale", "ties-normalize-false", "dare-ties",
        "dare-ties-flags"])
def test_variant_equals_stock_method_with_lambda_weights(ours, stock, extra, llama_family, tmp_path):
    from mergekit.options import MergeOptions

    paths, sds = llama_family
    lams, _ = closed_form(sds["base"], [sds[m] for m in MODELS])
    options = MergeOptions(copy_tokenizer=False, quiet=True, random_seed=1234)
    config = recipe(paths, MODELS, method=ours, parameters={"density": 0.55, **extra})
    mine = run_recipe(config, str(tmp_path / "ours"), options)
    LoaderCache().flush_all()
    theirs = run_recipe(stock_recipe(paths, stock, lams, 0.55, **extra), str(tmp_path / "stock"), options)
    sparse_seen = False
    for name in mine:
        assert torch.allclose(mine[name], theirs[name], atol=2e-6, rtol=0), name
        delta = mine[name] - sds["base"][name]
        sparse_seen |= bool((delta == 0).any()) and mine[name].ndim == 2
    assert sparse_seen  # the sparsification really ran


def test_dare_is_reproducible_with_a_seed(llama_family, tmp_path):
    from mergekit.options import MergeOptions

    paths, _ = llama_family
    options = MergeOptions(copy_tokenizer=False, quiet=True, random_seed=7)
    config = recipe(paths, MODELS, method="metagpt_dare", parameters={"density": 0.5})
    a = run_recipe(config, str(tmp_path / "a"), options)
    b = run_recipe(config, str(tmp_path / "b"), options)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _trimmed_norms(base, models, densities):
    """Independent ‖TIES-trimmed δ‖²: per tensor, the k = max(1, int(density·numel))
    entries of largest |δ| (no rescale for ties), in float64."""
    out = {}
    for name, sd in models.items():
        total = 0.0
        for key in base:
            delta = (sd[key].double() - base[key].double()).reshape(-1)
            k = max(1, int(densities[name] * delta.numel()))
            total += float(delta.abs().topk(k).values.pow(2).sum())
        out[name] = total
    return out


def _dense_norms(base, models):
    return {n: sum(float((sd[k].double() - base[k].double()).pow(2).sum()) for k in base) for n, sd in models.items()}


def _normalized(norms):
    total = sum(norms.values())
    return {k: v / total for k, v in norms.items()}


def test_lambda_from_sparse_uses_sparsified_norms_ties_in_memory():
    from mergekit.merge_methods import merge_state_dicts

    from checkpoints import perturbed, random_state_dict

    base = random_state_dict(5)
    models = {"a": perturbed(base, 0.02, 1), "b": perturbed(base, 0.03, 2)}
    sds = {"base": base, **models}
    # density 1 keeps everything: sparse and dense λ agree
    dense = merge_state_dicts(sds, "metagpt_ties", base="base", parameters={"density": 1.0})
    same = merge_state_dicts(sds, "metagpt_ties", base="base", parameters={"density": 1.0, "lambda_from": "sparse"})
    assert all(torch.allclose(dense[k], same[k], atol=1e-6) for k in dense)
    densities = {"a": 0.05, "b": 0.9}
    lams = _normalized(_trimmed_norms(base, models, densities))
    dense_lams = _normalized(_dense_norms(base, models))
    assert abs(lams["a"] - dense_lams["a"]) > 0.1  # the two readings really differ here
    ours = merge_state_dicts(sds, "metagpt_ties", base="base",
                             parameters={"density": densities, "lambda_from": "sparse"})
    for weights, should_match in ((lams, True), (dense_lams, False)):
        stock = merge_state_dicts(sds, "ties", base="base", parameters={
            "density": densities, "weight": weights, "normalize": False})
        close = all(torch.allclose(ours[k], stock[k], atol=1e-6, rtol=0) for k in ours)
        assert close is should_match, weights


def test_lambda_from_sparse_uses_sparsified_norms_ties_merge(llama_family, tmp_path):
    """A graph merge: λ (record) and output match stock ties with λ from the trimmed vectors."""
    import json

    from mergekit.options import MergeOptions

    paths, sds = llama_family
    options = MergeOptions(copy_tokenizer=False, quiet=True)
    densities = {"model0": 0.3, "model2": 0.7}
    lams = _normalized(_trimmed_norms(sds["base"], {m: sds[m] for m in densities}, densities))
    config = recipe(paths, list(densities), method="metagpt_ties", parameters={"lambda_from": "sparse"})
    config["models"] = [{"model": paths[m], "parameters": {"density": d}} for m, d in densities.items()]
    mine = run_recipe(config, str(tmp_path / "ours"), options)
    record = json.load(open(tmp_path / "ours" / "metagpt_coefficients.json"))
    for row, model in zip(record["merges"][0]["models"], densities):
        assert abs(row["lambda"] - lams[model]) < 1e-6, (model, row, lams)
    LoaderCache().flush_all()
    stock = recipe(paths, list(densities), method="ties", parameters={"normalize": False})
    stock["models"] = [{"model": paths[m], "parameters": {"density": d, "weight": lams[m]}} for m, d in densities.items()]
    theirs = run_recipe(stock, str(tmp_path / "stock"), options)
    for name in mine:
        assert torch.allclose(mine[name], theirs[name], atol=2e-6, rtol=0), name


def _dare_expected(norms, densities):
    """E‖DARE(δ)‖² ≈ ‖δ‖²/p (keep each entry with probability p, l1 rescale ≈ 1/p)."""
    return _normalized({m: norms[m] / densities[m] for m in norms})


def test_lambda_from_sparse_uses_sparsified_norms_dare_merge(llama_family, tmp_path):
    import json

    from mergekit.options import MergeOptions

    paths, sds = llama_family
    densities = {"model0": 0.3, "model1": 0.8}
    norms = _dense_norms(sds["base"], {m: sds[m] for m in densities})
    expected = _dare_expected(norms, densities)
    dense = _normalized(norms)
    no_rescale = _normalized({m: norms[m] * densities[m] for m in norms})
    config = recipe(paths, list(densities), method="metagpt_dare", parameters={"lambda_from": "sparse"})
    config["models"] = [{"model": paths[m], "parameters": {"density": d}} for m, d in densities.items()]
    by_seed = []
    for seed in (3, 4):
        out = tmp_path / f"out{seed}"
        run_recipe(config, str(out), MergeOptions(copy_tokenizer=False, quiet=True, random_seed=seed))
        record = json.load(open(out / "metagpt_coefficients.json"))
        by_seed.append({m: row["lambda"] for m, row in zip(densities, record["merges"][0]["models"])})
    for got in by_seed:
        # ~20k entries per model: the sampling error of λ is well under 0.01
        assert abs(got["model0"] - expected["model0"]) < 0.02, (got, expected)
        for wrong in (dense, no_rescale):  # far from the dense λ and from unrescaled masks
            assert abs(got["model0"] - wrong["model0"]) > 0.08, (got, wrong)
    # random masks' norms, not their expectation ‖δ‖²/p: another seed, other λ
    assert abs(by_seed[0]["model0"] - by_seed[1]["model0"]) > 1e-7, by_seed


def test_lambda_from_sparse_uses_sparsified_norms_dare_in_memory(monkeypatch):
    """In memory, on larger tensors: λ within a tight statistical bound of ‖δ‖²/p."""
    from mergekit.merge_methods import merge_state_dicts

    from mergekit_metagpt.method import MetaGPTMerge

    seen = []
    original = MetaGPTMerge.merge_with_lambdas

    def spy(self, group, lambdas, parameters):
        seen.append(dict(lambdas))
        return original(self, group, lambdas, parameters)

    monkeypatch.setattr(MetaGPTMerge, "merge_with_lambdas", spy)
    gen = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(256, 512, generator=gen) for i in range(3)}
    models = {
        "a": {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()},
        "b": {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in base.items()},
    }
    densities = {"a": 0.3, "b": 0.8}
    by_seed = []
    for seed in (0, 1):
        seen.clear()
        torch.manual_seed(seed)
        merge_state_dicts({"base": base, **models}, "metagpt_dare", base="base",
                          parameters={"density": densities, "lambda_from": "sparse"})
        assert seen and all(s == seen[0] for s in seen)
        by_seed.append(seen[0])
    expected = _dare_expected(_dense_norms(base, models), densities)
    for lambdas in by_seed:
        assert abs(lambdas["a"] - expected["a"]) < 0.005, (lambdas, expected)
    # the norms of random masks, not their expectation ‖δ‖²/p (which the bound above
    # cannot tell apart): another seed draws other masks, and other λ
    assert abs(by_seed[0]["a"] - by_seed[1]["a"]) > 1e-7, by_seed


def test_per_tensor_granularity_uses_each_tensors_own_norms():
    from mergekit.merge_methods import merge_state_dicts

    from checkpoints import perturbed, random_state_dict

    base = random_state_dict(6)
    a, b = perturbed(base, 0.01, 1), perturbed(base, 0.05, 2)
    # make one tensor's task vectors rank the models the other way round
    name = "model.layers.1.mlp.down_proj.weight"
    a[name], b[name] = base[name] + 0.2, base[name] + 0.1
    merged = merge_state_dicts({"base": base, "a": a, "b": b}, "metagpt", base="base",
                               parameters={"granularity": "per_tensor"})
    for key in base:
        da, db = (a[key] - base[key]).double(), (b[key] - base[key]).double()
        na, nb = float(da.pow(2).sum()), float(db.pow(2).sum())
        expected = base[key].double() + (na * da + nb * db) / (na + nb)
        assert (merged[key].double() - expected).abs().max() < 1e-5, key
