"""Checks of a MetaGPT recipe that mergekit does not make, run before anything is read.

mergekit 0.1.5 resolves only the parameters a method declares, so a misspelt name, or
a shared parameter such as ``lambda`` given per model, would be ignored silently. One
function, ``check_config``, is called by the ``run_merge`` wrapper (``mergekit-yaml``,
``run_merge``, ``mergekit-multi``) and by ``mergekit-metagpt coefficients|bake|inspect``.
"""

from __future__ import annotations

from typing import Any, Iterator, Set, Tuple

from mergekit_metagpt.errors import MetaGPTError

# Pydantic classes of mergekit's config whose `parameters` belong to one input model.
PER_INPUT = ("InputModelDefinition", "InputSliceDefinition")

WEIGHT_HELP = (
    "MetaGPT computes each model's weight (λ) from the task-vector norms; to set "
    "weights by hand, `mergekit-metagpt bake RECIPE.yml OUT.yml` writes the equivalent "
    "stock recipe with the λ as weights you can edit"
)


def _parameter_names(node: Any, seen: Set[int], per_input: bool = False) -> Iterator[Tuple[str, bool]]:
    """(name, given per input model) for every parameter setting in a config tree."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, dict):
        for value in node.values():
            yield from _parameter_names(value, seen)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _parameter_names(value, seen)
    elif hasattr(type(node), "model_fields"):
        mine = type(node).__name__ in PER_INPUT
        for name in type(node).model_fields:
            value = getattr(node, name, None)
            if name == "parameters" and isinstance(value, dict):
                for key in value:
                    yield key, mine
            elif value is not None:
                yield from _parameter_names(value, seen)


def check_config(config) -> None:
    """Refuse unknown parameter names and shared parameters given per model."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import ParameterScope

    method_name = getattr(config, "merge_method", None)
    spec = registry.get(method_name).spec
    shared = {p.name for p in spec.parameters if p.scope == ParameterScope.SHARED}
    per_input = {p.name for p in spec.parameters if p.scope != ParameterScope.SHARED}
    unknown, misplaced = set(), set()
    for name, given_per_input in _parameter_names(config, set()):
        if name not in shared | per_input:
            unknown.add(name)
        elif given_per_input and name in shared:
            misplaced.add(name)
    if unknown:
        message = (
            f"Unknown parameter(s) for {method_name}: {', '.join(sorted(unknown))} "
            f"(it takes: {', '.join(sorted(shared | per_input))})"
        )
        if "weight" in unknown:
            message += f". {WEIGHT_HELP}"
        raise MetaGPTError(message)
    if misplaced:
        raise MetaGPTError(
            f"Parameter(s) {', '.join(sorted(misplaced))} of {method_name} apply to the whole "
            f"merge (one value for every model), but are given for a single model; move them "
            f"to the top-level (or slice-level) `parameters:`"
        )
