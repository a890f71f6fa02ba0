"""Read a metagpt recipe's base and models, with one-line errors for bad recipes."""

from __future__ import annotations

import os
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


STOCK = {"metagpt": "task_arithmetic", "metagpt_ties": "ties", "metagpt_dare": "dare_linear"}
OURS_ONLY = ("granularity", "lambda_from", "alpha")


def check_metagpt(config, path: str = "recipe") -> None:
    if config.merge_method not in STOCK:
        raise MetaGPTError(f"{path}: merge_method is {config.merge_method!r}, not a metagpt method")
    if config.base_model is None and not _every_slice_has_a_base(config):
        raise MetaGPTError(f"{path}: MetaGPT needs a base_model")


def _every_slice_has_a_base(config) -> bool:
    """Without a top-level base_model: the recipe merges only slices (its own or its
    modules'), each with a base_model of its own."""
    owners = [config, *(config.modules or {}).values()]
    slices = [piece for owner in owners for piece in owner.slices or []]
    return (bool(slices) and not any(owner.models for owner in owners)
            and all(piece.base_model is not None for piece in slices))


def check_bakeable_recipe(config, path: str = "recipe") -> None:
    """Before planning (mergekit's planner rewrites the config): a `models:` recipe."""
    if not config.models or config.slices or config.modules:
        raise MetaGPTError(
            f"{path}: bake writes one weight per model, from a `models:` recipe; a slices: or "
            f"modules: recipe merges each model set with its own λ (see `coefficients`), "
            f"which bake does not write"
        )


def check_bakeable(run, path: str = "recipe") -> None:
    """One dense, global λ per model: anything else cannot be baked."""
    for merge_set in run.sets.values():
        params = [dict(t.parameters.items()) for t in merge_set.tasks]
        if any(p.get("granularity", "global") != "global" for p in params):
            raise MetaGPTError(f"{path}: granularity per_tensor gives a λ per tensor; "
                               "only granularity: global has one coefficient per model")
        if any(p.get("lambda_from", "dense") != "dense" for p in params):
            raise MetaGPTError(f"{path}: lambda_from: sparse depends on the sparsification masks; "
                               "bake supports lambda_from: dense")


def baked_recipe(path: str, run, coefficients) -> str:
    """The recipe at `path` as a stock mergekit recipe with the λ filled in as weights."""
    from mergekit.common import ModelReference

    from mergekit_metagpt import __version__
    from mergekit_metagpt.coefficients import formula

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    method = data["merge_method"]
    data["merge_method"] = STOCK[method]
    params = {k: v for k, v in (data.get("parameters") or {}).items() if k not in OURS_ONLY}
    params["normalize"] = False
    data["parameters"] = params
    lambdas = coefficients.lambdas
    base = ModelReference.model_validate(data.get("base_model"))
    for entry in data["models"]:
        model = ModelReference.model_validate(entry["model"])  # every form mergekit accepts
        if model == base:
            continue
        entry["parameters"] = {**(entry.get("parameters") or {}), "weight": lambdas[model]}
    header = [
        f"# Baked by mergekit-metagpt {__version__} from {os.path.basename(path)} ({method}).",
        f"# The weights are MetaGPT coefficients, {formula([coefficients.alpha], ascii=True)}",
        "# with delta_t = theta_t - theta_0",
        "# (Zhou et al., 2024, arXiv 2406.11385), computed over every tensor the merge reads:",
    ]
    header += [f"#   {model}: ||delta||^2 = {norm:.6e}, lambda = {lambdas[model]:.6f}"
               for model, norm in coefficients.squared_norms]
    header.append("# It runs on stock mergekit, without the plugin. Re-bake if any checkpoint changes.")
    return "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False)
