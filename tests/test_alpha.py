"""``alpha``: tempered coefficients λ_t ∝ (‖δ_t‖²)^alpha (1: the paper, 0: the average)."""

import json

import pytest
import torch
import yaml

import mergekit_metagpt  # noqa: F401
from checkpoints import closed_form
from merging import recipe, run_recipe, write_yaml
from mergekit.io.tasks import LoaderCache
from mergekit.merge_methods import merge_state_dicts
from test_variants import stock_recipe

MODELS = ["model0", "model1", "model2"]


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_tempered_graph_merge_matches_closed_form(alpha, llama_family, merge_options, tmp_path):
    paths, sds = llama_family
    out = tmp_path / "out"
    merged = run_recipe(recipe(paths, MODELS, parameters={"alpha": alpha}), str(out), merge_options)
    lams, reference = closed_form(sds["base"], [sds[m] for m in MODELS], alpha=alpha)
    paper, _ = closed_form(sds["base"], [sds[m] for m in MODELS])
    assert max(abs(a - b) for a, b in zip(lams, paper)) > 0.1  # tempering changes the weights
    if alpha == 0.0:
        assert lams == pytest.approx([1 / 3] * 3)  # the plain average of the fine-tunes
    for name, ref in reference.items():
        assert (merged[name].double() - ref).abs().max().item() < 1e-5, name
    record = json.load(open(out / "metagpt_coefficients.json"))
    (entry,) = record["merges"]
    assert entry["alpha"] == alpha
    assert [m["lambda"] for m in entry["models"]] == pytest.approx(lams, abs=1e-9)
    card = open(out / "README.md", encoding="utf-8").read()
    assert f"^α with α = {alpha:g}" in card


def test_tempered_in_memory_merge_matches_closed_form(llama_family):
    _, sds = llama_family
    merged = merge_state_dicts({"base": sds["base"], **{m: sds[m] for m in MODELS}}, "metagpt",
                               base="base", parameters={"alpha": 0.5})
    _, reference = closed_form(sds["base"], [sds[m] for m in MODELS], alpha=0.5)
    for name, ref in reference.items():
        assert (merged[name].double() - ref).abs().max().item() < 1e-5, name


def test_tempered_ties_equals_stock_ties_with_tempered_weights(llama_family, tmp_path):
    from mergekit.options import MergeOptions

    paths, sds = llama_family
    lams, _ = closed_form(sds["base"], [sds[m] for m in MODELS], alpha=0.5)
    options = MergeOptions(copy_tokenizer=False, quiet=True)
    config = recipe(paths, MODELS, method="metagpt_ties", parameters={"density": 0.55, "alpha": 0.5})
    mine = run_recipe(config, str(tmp_path / "ours"), options)
    LoaderCache().flush_all()
    theirs = run_recipe(stock_recipe(paths, "ties", lams, 0.55), str(tmp_path / "stock"), options)
    for name in mine:
        assert torch.allclose(mine[name], theirs[name], atol=2e-6, rtol=0), name


def test_bake_writes_the_tempered_weights(llama_family, tmp_path):
    from mergekit_metagpt.cli import main

    paths, sds = llama_family
    source = write_yaml(recipe(paths, MODELS, parameters={"alpha": 0.5}), str(tmp_path / "r.yml"))
    baked_path = str(tmp_path / "baked.yml")
    assert main(["bake", source, baked_path]) == 0
    baked = yaml.safe_load(open(baked_path))
    assert "alpha" not in baked["parameters"]  # stock task_arithmetic has no alpha
    lams, _ = closed_form(sds["base"], [sds[m] for m in MODELS], alpha=0.5)
    assert [m["parameters"]["weight"] for m in baked["models"]] == pytest.approx(lams, abs=1e-7)
