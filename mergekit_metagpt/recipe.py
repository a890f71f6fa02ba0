"""Read a metagpt recipe's base and models, with one-line errors for bad recipes."""

from __future__ import annotations

import os
from typing import List, Tuple

import yaml

from mergekit_metagpt.errors import MetaGPTError


def load_recipe(path: str):
    """Parse a mergekit YAML recipe into a MergeConfiguration."""
    from mergekit.config import MergeConfiguration

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as error:
        raise MetaGPTError(f"cannot read recipe {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or "syntax error"
        raise MetaGPTError(f"recipe {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise MetaGPTError(f"recipe {path} is not a YAML mapping")
    try:
        return MergeConfiguration.model_validate(data)
    except Exception as error:  # pydantic's message, on one line
        first = str(error).splitlines()
        raise MetaGPTError(f"recipe {path} is not a valid mergekit recipe: {' '.join(first[:3])}") from None


def base_and_models(config, path: str = "recipe") -> Tuple[object, List[object]]:
    if not str(config.merge_method).startswith("metagpt"):
        raise MetaGPTError(f"{path}: merge_method is {config.merge_method!r}, not a metagpt method")
    if config.base_model is None:
        raise MetaGPTError(f"{path}: MetaGPT needs a base_model")
    if not config.models:
        raise MetaGPTError(f"{path}: only recipes with a top-level `models:` list are supported here")
    models = [m.model for m in config.models if m.model != config.base_model]
    if not models:
        raise MetaGPTError(f"{path}: MetaGPT needs at least one model besides the base model")
    return config.base_model, models


STOCK = {"metagpt": "task_arithmetic", "metagpt_ties": "ties", "metagpt_dare": "dare_linear"}
OURS_ONLY = ("granularity", "lambda_from")


def check_bakeable(config, path: str = "recipe") -> None:
    """Global, dense λ are one number per model: anything else cannot be baked."""
    params = config.parameters or {}
    if params.get("granularity", "global") != "global":
        raise MetaGPTError(f"{path}: granularity {params['granularity']!r} gives a λ per tensor; "
                           "only granularity: global has one coefficient per model")
    if params.get("lambda_from", "dense") != "dense":
        raise MetaGPTError(f"{path}: lambda_from: sparse depends on the sparsification masks; "
                           "coefficients and bake support lambda_from: dense")


def baked_recipe(path: str, coefficients) -> str:
    """The recipe at `path` as a stock mergekit recipe with the λ filled in as weights."""
    from mergekit_metagpt import __version__

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    method = data["merge_method"]
    data["merge_method"] = STOCK[method]
    params = {k: v for k, v in (data.get("parameters") or {}).items() if k not in OURS_ONLY}
    params["normalize"] = False
    data["parameters"] = params
    lambdas = {str(model): lam for model, lam in coefficients.lambdas.items()}
    base = str(data.get("base_model"))
    for entry in data["models"]:
        name = str(entry["model"])
        if name == base:
            continue
        entry["parameters"] = {**(entry.get("parameters") or {}), "weight": lambdas[name]}
    header = [
        f"# Baked by mergekit-metagpt {__version__} from {os.path.basename(path)} ({method}).",
        "# The weights are MetaGPT coefficients, lambda_t = ||theta_t - theta_0||^2 / sum_k ||theta_k - theta_0||^2",
        "# (Zhou et al., 2024, arXiv 2406.11385), computed over every tensor of each checkpoint:",
    ]
    header += [f"#   {model}: ||delta||^2 = {norm:.6e}, lambda = {lambdas[str(model)]:.6f}"
               for model, norm in coefficients.squared_norms]
    header.append("# It runs on stock mergekit, without the plugin. Re-bake if any checkpoint changes.")
    return "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False)
