"""``bake``: a metagpt `models:` recipe as a stock mergekit recipe, the λ as weights."""

from __future__ import annotations

import os

import yaml

from mergekit_metagpt.errors import MetaGPTError
from mergekit_metagpt.method import VARIANTS

#: The stock method each variant runs per tensor with weight = λ_t, normalize = false.
STOCK = {name: stock or "task_arithmetic" for name, stock in VARIANTS.items()}


def ours_only(method: str) -> set:
    """The parameters of our `method` that its stock method does not take (granularity,
    alpha, lambda_from): left out of the baked recipe."""
    from mergekit.merge_methods import registry

    def names(name):
        return {p.name for p in registry.get(name).spec.parameters}

    return names(method) - names(STOCK[method])


def check_bakeable_recipe(config, path: str = "recipe") -> None:
    """Before planning (mergekit's planner rewrites the config): a `models:` recipe."""
    if not config.models or config.slices or config.modules:
        found = "slices:" if config.slices else "modules:" if config.modules else "no models:"
        raise MetaGPTError(
            f"{path}: bake writes one weight per model, from a `models:` recipe; this one has {found} "
            f"(a slices: or modules: recipe merges each model set with its own λ, which bake does not "
            f"write: see `coefficients`; for an architecture of one module, a modules: recipe is its "
            f"models: list under that module's name: write it as a models: recipe to bake it)"
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
                               "bake supports lambda_from: dense (bake the same recipe with "
                               "lambda_from: dense, or merge this one with the plugin itself)")


def baked_recipe(path: str, coefficients, text: str) -> str:
    """The recipe at `path` (its `text`, the one the λ were computed from: the file is not
    read again) as a stock mergekit recipe with the λ filled in as weights."""
    from mergekit.common import ModelReference

    from mergekit_metagpt import __version__
    from mergekit_metagpt.coefficients import formula

    data = yaml.safe_load(text)
    method = data["merge_method"]
    data["merge_method"] = STOCK[method]
    dropped = ours_only(method)
    params = {k: v for k, v in (data.get("parameters") or {}).items() if k not in dropped}
    params["normalize"] = False
    data["parameters"] = params
    lambdas = coefficients.lambdas
    base = ModelReference.model_validate(data.get("base_model"))
    pinned: dict = {}  # model as written -> its commit
    for entry in data["models"]:
        model = ModelReference.model_validate(entry["model"])  # every form mergekit accepts
        if model != base:
            entry["parameters"] = {**(entry.get("parameters") or {}), "weight": lambdas[model]}
        entry["model"] = _pinned(entry["model"], model, pinned)
    data["base_model"] = _pinned(data["base_model"], base, pinned)
    header = [
        f"# Baked by mergekit-metagpt {__version__} from {os.path.basename(path)} ({method}).",
        f"# The weights are MetaGPT coefficients, {formula([coefficients.alpha], ascii=True)}",
        "# with delta_t = theta_t - theta_0",
        "# (Zhou et al., 2024, arXiv 2406.11385), computed over every tensor the merge reads:",
    ]
    header += [f"#   {model}: ||delta||^2 = {norm:.6e}, lambda = {lambdas[model]:.6f}"
               for model, norm in coefficients.squared_norms]
    if pinned:
        header.append("# Hub models pinned to the commits the weights were computed from: "
                      + ", ".join(f"{model} -> {commit[:12]}" for model, commit in pinned.items()) + ".")
    header.append("# It runs on stock mergekit, without the plugin. Re-bake if any checkpoint changes.")
    # a name with a line break (a folder may have one) would end its comment line early
    header = ["\n# ".join(line.splitlines()) for line in header]
    return "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _pinned(written, model, pinned: dict):
    """A hub model as ``org/name@<commit>``, the commit of the snapshot mergekit read for the
    λ (its branch may move on); anything else as the recipe wrote it."""
    import re

    from mergekit_metagpt.merge_plan import read_folder

    if model.lora is not None or os.path.exists(model.model.path):
        return written
    folder = read_folder(model)  # None where not opened here: as written
    found = re.search(r"[\\/]snapshots[\\/]([0-9a-f]{40})$", folder or "")
    if found is None or model.model.revision == found.group(1):
        return written
    commit = found.group(1)
    pinned[str(model)] = commit
    return str(model.model_copy(update={"model": model.model.model_copy(update={"revision": commit})}))
