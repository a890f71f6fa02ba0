"""The shipped example recipes: all valid; the tiny ones run on demo-models output."""

import glob
import os

import pytest
import yaml

import mergekit_metagpt  # noqa: F401
from checkpoints import load_checkpoint
from mergekit.config import MergeConfiguration
from mergekit_metagpt.cli import main

EXAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "yaml", "*.yml")))


def test_there_are_examples_for_each_method():
    methods = {yaml.safe_load(open(p))["merge_method"] for p in EXAMPLES}
    assert {"metagpt", "metagpt_ties", "metagpt_dare"} <= methods


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_is_a_valid_recipe(path):
    config = MergeConfiguration.model_validate(yaml.safe_load(open(path)))
    assert config.merge_method.startswith("metagpt") and config.base_model is not None


@pytest.mark.parametrize("name", ["metagpt-tiny.yml", "metagpt-tiny-ties.yml"])
def test_tiny_example_runs_on_demo_models(name, tmp_path, monkeypatch, merge_options):
    from mergekit.merge import run_merge

    monkeypatch.chdir(tmp_path)
    assert main(["demo-models", "./tiny-models"]) == 0
    path = next(p for p in EXAMPLES if os.path.basename(p) == name)
    config = MergeConfiguration.model_validate(yaml.safe_load(open(path)))
    run_merge(config, "./merged", options=merge_options)
    merged = load_checkpoint("./merged")
    assert "lm_head.weight" in merged and os.path.exists("./merged/metagpt_coefficients.json")
