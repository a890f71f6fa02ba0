"""The shipped example recipes: all valid; the tiny ones run on demo-models output."""

import glob
import os
import re

import pytest
import yaml

import mergekit_metagpt  # noqa: F401
from checkpoints import closed_form, load_checkpoint
from mergekit.config import MergeConfiguration
from mergekit_metagpt.cli import main

EXAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "yaml", "*.yml")))


def test_there_are_examples_for_each_method():
    methods = {yaml.safe_load(open(p))["merge_method"] for p in EXAMPLES}
    assert {"metagpt", "metagpt_ties", "metagpt_dare", "metagpt_dare_ties"} <= methods


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_is_a_valid_recipe(path):
    config = MergeConfiguration.model_validate(yaml.safe_load(open(path)))
    assert config.merge_method.startswith("metagpt") and config.base_model is not None


TINY = ["metagpt-tiny.yml", "metagpt-tiny-ties.yml", "metagpt-tiny-dare.yml", "metagpt-tiny-dare-ties.yml",
        "metagpt-tiny-tempered.yml"]


def test_each_method_has_a_tiny_example():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert set(TINY) <= names
    tiny = {yaml.safe_load(open(p))["merge_method"] for p in EXAMPLES if os.path.basename(p) in TINY}
    assert tiny == {"metagpt", "metagpt_ties", "metagpt_dare", "metagpt_dare_ties"}


@pytest.mark.parametrize("name", TINY)
def test_tiny_example_runs_on_demo_models(name, tmp_path, monkeypatch, merge_options, capsys):
    import json

    from mergekit.merge import run_merge

    from mergekit_metagpt import prepass

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    assert main(["demo-models", "./tiny-models"]) == 0
    path = next(p for p in EXAMPLES if os.path.basename(p) == name)
    recipe = yaml.safe_load(open(path))
    config = MergeConfiguration.model_validate(recipe)
    runs = prepass.STATS.runs
    run_merge(config, "./merged", options=merge_options)
    assert prepass.STATS.runs == runs + 1
    merged = load_checkpoint("./merged")
    assert "lm_head.weight" in merged
    with open("./merged/metagpt_coefficients.json") as f:
        record = json.load(f)
    (entry,) = record["merges"]
    assert record["merge_method"] == recipe["merge_method"]
    assert [m["model"] for m in entry["models"]] == [m["model"] for m in recipe["models"]]
    assert abs(sum(m["lambda"] for m in entry["models"]) - 1.0) < 1e-9
    # λ of the dense task vectors, tempered by the recipe's alpha, in float64 from the files
    base = load_checkpoint("./tiny-models/base")
    lams, _ = closed_form(base, [load_checkpoint(m["model"]) for m in recipe["models"]],
                          alpha=(recipe.get("parameters") or {}).get("alpha", 1.0))
    assert [m["lambda"] for m in entry["models"]] == pytest.approx(lams, abs=1e-7)
    # the CLI reads the same example the same way
    capsys.readouterr()
    assert main(["coefficients", path, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [m["lambda"] for m in printed["merges"][0]["models"]] == [m["lambda"] for m in entry["models"]]


def _readme_text() -> str:
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8") as f:
        return f.read()


def _readme_python_blocks():
    blocks, inside, lines = [], False, []
    for line in _readme_text().splitlines():
        if line.strip() == "```python":
            inside, lines = True, []
        elif inside and line.strip() == "```":
            inside = False
            blocks.append("\n".join(lines))
        elif inside:
            lines.append(line)
    return blocks


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    """The README's "From Python" code, run as written from a folder holding the demo
    models, merges them to the closed form."""
    import torch

    from checkpoints import closed_form

    (block,) = _readme_python_blocks()
    monkeypatch.chdir(tmp_path)
    assert main(["demo-models", "./tiny-models"]) == 0
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    models = namespace["models"]
    lams, reference = closed_form(models["base"], [models["math"], models["code"]])
    # the λ the README says it logs
    said = re.search(r"Two models here, so the λ logged are math ([\d.]+), code ([\d.]+)", _readme_text())
    assert said and [float(v) for v in said.groups()] == [round(lam, 6) for lam in lams], (said, lams)
    merged = namespace["merged"]
    assert set(merged) == set(reference)
    def close(a, ref):  # bf16 output: within one bf16 rounding step
        return torch.allclose(a.float(), ref.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6)

    for name, ref in reference.items():
        assert close(merged[name], ref), name
    # the check tells MetaGPT's λ from a plain average of the two task vectors
    base = models["base"]
    average = {k: base[k].double() + 0.5 * sum(models[m][k].double() - base[k].double() for m in ("math", "code"))
               for k in base}
    assert not all(close(merged[k], average[k]) for k in average)
