"""Helpers to run a merge in-process and read the result back."""

from __future__ import annotations

import os

import yaml

from checkpoints import load_checkpoint


def run_recipe(recipe: dict, out: str, options):
    import mergekit_metagpt  # noqa: F401  (registration; also done by the hook)
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge

    config = MergeConfiguration.model_validate(recipe)
    run_merge(config, out, options=options)
    return load_checkpoint(out)


def recipe(paths: dict, models, method="metagpt", dtype="float32", parameters=None, **extra):
    out = {
        "merge_method": method,
        "base_model": paths["base"],
        "dtype": dtype,
        "models": [{"model": paths[m]} for m in models],
    }
    if parameters:
        out["parameters"] = parameters
    out.update(extra)
    return out


def slices_recipe(paths):
    """Layer 0 merges model0 + model1, layer 1 merges model1 + model2 (same base)."""
    def source(name, layers):
        return {"model": paths[name], "layer_range": layers}

    return {
        "merge_method": "metagpt",
        "base_model": paths["base"],
        "dtype": "float32",
        "slices": [
            {"sources": [source("base", [0, 1]), source("model0", [0, 1]), source("model1", [0, 1])]},
            {"sources": [source("base", [1, 2]), source("model1", [1, 2]), source("model2", [1, 2])]},
        ],
    }


def write_yaml(data: dict, path: str) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return path


def safetensors_in(path: str):
    return [f for f in os.listdir(path) if f.endswith(".safetensors")] if os.path.isdir(path) else []


def run_mergekit_yaml(config_path: str, out: str, *flags: str):
    """Stock mergekit-yaml in a fresh process (start-up hook, no import of ours)."""
    import subprocess
    import sys

    return subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"), config_path, out,
         "--no-copy-tokenizer", "--quiet", *flags],
        capture_output=True, text=True, timeout=600,
    )
