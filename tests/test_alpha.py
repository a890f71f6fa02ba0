"""``alpha``: tempered coefficients λ_t ∝ (‖δ_t‖²)^alpha (1: the paper, 0: the average)."""

import json
import os

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
    # the norms are exact to ~1e-8 relative (tests/test_norm_precision.py), the λ to as much:
    # 2e-9 apart was seen in another environment (summation order)
    assert [m["lambda"] for m in entry["models"]] == pytest.approx(lams, abs=1e-8)
    card = open(out / "README.md", encoding="utf-8").read()
    assert f"(‖δ_k‖²)^α, α = {alpha:g}, with δ_t = θ_t − θ₀" in card


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


def test_coefficients_prints_the_tempered_formula_and_bake_writes_it(llama_family, tmp_path, capsys):
    from mergekit_metagpt.cli import main

    paths, _ = llama_family
    source = write_yaml(recipe(paths, MODELS, parameters={"alpha": 0.5}), str(tmp_path / "r.yml"))
    assert main(["coefficients", source]) == 0
    printed = capsys.readouterr().out
    assert "tempered: lambda_t = (||delta_t||^2)^alpha / sum_k (||delta_k||^2)^alpha, alpha = 0.5" in printed
    baked = str(tmp_path / "baked.yml")
    assert main(["bake", source, baked]) == 0
    header = open(baked).read().splitlines()[1]
    assert header.endswith("(||delta_t||^2)^alpha / sum_k (||delta_k||^2)^alpha, alpha = 0.5"), header


def test_each_model_set_of_a_slices_recipe_takes_its_own_alpha(llama_family, merge_options, tmp_path):
    from merging import slices_recipe
    from test_record import slice_sets

    paths, sds = llama_family
    config = slices_recipe(paths)
    config["slices"][0]["parameters"] = {"alpha": 0.5}
    out = tmp_path / "out"
    run_recipe(config, str(out), merge_options)
    record = json.load(open(out / "metagpt_coefficients.json"))
    assert [e["alpha"] for e in record["merges"]] == [0.5, 1.0]
    for entry, (_, _, _, norms), alpha in zip(record["merges"], slice_sets(sds), (0.5, 1.0)):
        powers = [n ** alpha for n in norms]
        assert [m["lambda"] for m in entry["models"]] == pytest.approx([p / sum(powers) for p in powers], abs=1e-6)


def test_per_tensor_lambda_at_alpha_0_leaves_out_a_model_without_the_tensor():
    """A model that lacks an optional tensor is not merged into it (mergekit leaves it out
    of the group): its λ there is 0, and the others share the tensor's weight."""
    from types import SimpleNamespace

    from mergekit_metagpt.merge_plan import MergeSet
    from mergekit_metagpt.set_norms import SetNorms

    task = SimpleNamespace(parameters={"alpha": 0.0, "granularity": "per_tensor"})
    merge_set = MergeSet("base", ("a", "b", "c"), [task, task])
    norms = SetNorms(merge_set, {"a": [1.0, 4.0], "b": [2.0, None], "c": [3.0, 0.0]})
    assert norms.task_lambdas(0) == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert norms.task_lambdas(1) == pytest.approx({"a": 0.5, "b": 0.0, "c": 0.5})


def test_alpha_minus_zero_is_zero():
    import math

    from mergekit_metagpt.parameters import alpha_number

    assert math.copysign(1.0, alpha_number(-0.0)) == 1.0
    assert alpha_number(1.0000001) is None and alpha_number(True) is None


def test_inspect_records_alpha_and_the_card_links_only_pictures_of_its_own_lambdas(llama_family, tmp_path):
    """Pictures that `inspect` drew for another alpha show other λ: the merge's card does
    not link them."""
    from mergekit_metagpt.cli import main
    from merging import run_mergekit_yaml

    paths, _ = llama_family
    out = str(tmp_path / "out")
    tempered = write_yaml(recipe(paths, MODELS, parameters={"alpha": 0.5}), str(tmp_path / "t.yml"))
    assert main(["inspect", tempered, out]) == 0
    report = json.load(open(os.path.join(out, "metagpt-inspect.json")))
    assert report["merges"][0]["alpha"] == 0.5
    assert "(‖δ_t‖²)^α / Σ_k (‖δ_k‖²)^α, α = 0.5" in open(os.path.join(out, "metagpt-report.md")).read()
    assert os.path.exists(os.path.join(out, "metagpt-lambdas.png"))
    result = run_mergekit_yaml(write_yaml(recipe(paths, MODELS), str(tmp_path / "r.yml")), out)
    assert result.returncode == 0, result.stderr
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "Cosine similarity of the task vectors" in card and "metagpt-lambdas.png" not in card
