"""mergekit-metagpt coefficients / bake, and the merge's own record."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from checkpoints import closed_form
from merging import run_mergekit_yaml, recipe, run_recipe, write_yaml
from mergekit.io.tasks import LoaderCache
from mergekit_metagpt.cli import main

MODELS = ["model0", "model1", "model2"]


def test_coefficients_table_and_json(llama_family, tmp_path, capsys):
    paths, sds = llama_family
    lams, _ = closed_form(sds["base"], [sds[m] for m in MODELS])
    config = write_yaml(recipe(paths, MODELS), str(tmp_path / "r.yml"))
    assert main(["coefficients", config]) == 0
    table = capsys.readouterr().out
    for model, lam in zip(MODELS, lams):
        assert f"{lam:.6f}" in next(l for l in table.splitlines() if paths[model] in l)
    assert main(["coefficients", config, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (merge,) = data["merges"]
    got = {m["model"]: m["lambda"] for m in merge["models"]}
    for model, lam in zip(MODELS, lams):
        assert abs(got[paths[model]] - lam) < 1e-7


@pytest.mark.parametrize("method, stock, params", [
    ("metagpt", "task_arithmetic", {"lambda": 0.8}),
    ("metagpt_ties", "ties", {"density": 0.55}),
])
def test_bake_gives_a_stock_recipe_with_the_same_merge(method, stock, params, llama_family, merge_options, tmp_path):
    paths, sds = llama_family
    original = recipe(paths, MODELS, method=method, parameters=params)
    source = write_yaml(original, str(tmp_path / "r.yml"))
    baked_path = str(tmp_path / "baked.yml")
    assert main(["bake", source, baked_path]) == 0
    text = open(baked_path).read()
    assert "arXiv 2406.11385" in text and text.startswith("# Baked by mergekit-metagpt")
    baked = yaml.safe_load(text)
    assert baked["merge_method"] == stock
    # the closed-form λ as weights, and the recipe's other parameters carried over
    lams, _ = closed_form(sds["base"], [sds[m] for m in MODELS])
    assert [m["parameters"]["weight"] for m in baked["models"]] == pytest.approx(lams, abs=1e-7)
    for key, value in params.items():
        assert baked["parameters"][key] == value, key
    a = run_recipe(original, str(tmp_path / "a"), merge_options)
    LoaderCache().flush_all()
    b = run_recipe(baked, str(tmp_path / "b"), merge_options)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=2e-6, rtol=0), name


@pytest.mark.parametrize("content, message", [
    (None, "cannot read recipe"),
    ("merge_method: [unclosed", "not valid YAML"),
    ("merge_method: metagpt\n---\nmerge_method: metagpt\n", "holds several YAML documents (a mergekit-multi file); "
                                                           "the CLI takes one recipe"),
    ("merge_method: metagpt\nmodels:\n  - model: x\n", "needs a base_model"),
    ("merge_method: linear\nbase_model: b\nmodels:\n  - model: x\n", "not a metagpt method"),
    ("merge_method: metagpt-dare\nbase_model: b\nmodels:\n  - model: x\n",
     "merge_method is 'metagpt-dare', not a metagpt method; did you mean 'metagpt_dare'?"),
    ("merge_method: metagpt\nbase_model: ./no-such-base\nmodels:\n  - model: ./no-such-model\n",
     "model ./no-such-base: no such folder (a relative path, read from the folder the command runs in: /"),
])
def test_cli_errors_are_one_line(content, message, tmp_path):
    path = str(tmp_path / "r.yml")
    if content is not None:
        open(path, "w").write(content)
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "mergekit-metagpt"), "coefficients", path],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("mergekit-metagpt: error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_output_holds_coefficients_record_and_card(llama_family, merge_options, tmp_path):
    paths, sds = llama_family
    lams, _ = closed_form(sds["base"], [sds[m] for m in MODELS])
    out = str(tmp_path / "out")
    run_recipe(recipe(paths, MODELS, dtype="float32"), out, merge_options)
    with open(os.path.join(out, "metagpt_coefficients.json")) as f:
        record = json.load(f)
    assert record["merge_method"] == "metagpt" and record["dtype"] == "float32"
    assert record["plugin_version"]
    (merge,) = record["merges"]
    for entry, model, lam in zip(merge["models"], MODELS, lams):
        assert entry["model"] == paths[model] and abs(entry["lambda"] - lam) < 1e-7
    card = open(os.path.join(out, "README.md")).read()
    assert "[MetaGPT](https://arxiv.org/abs/2406.11385)" in card


def test_model_card_gets_the_lambda_table_from_mergekit_yaml(llama_family, tmp_path):
    paths, sds = llama_family
    lams, _ = closed_form(sds["base"], [sds[m] for m in MODELS])
    config = write_yaml(recipe(paths, MODELS), str(tmp_path / "r.yml"))
    out = str(tmp_path / "out")
    result = run_mergekit_yaml(config, out)
    assert result.returncode == 0, result.stderr
    card = open(os.path.join(out, "README.md")).read()
    assert "[MetaGPT](https://arxiv.org/abs/2406.11385)" in card
    assert card.count("## MetaGPT coefficients") == 1
    for model, lam in zip(MODELS, lams):
        row = next(l for l in card.splitlines() if l.startswith(f"| {paths[model]} |"))
        assert abs(float(row.split("|")[3]) - lam) < 1e-6
