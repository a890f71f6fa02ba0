"""Parameter types and recipe checks for the MetaGPT methods.

mergekit 0.1.5 resolves only the parameters a method declares, so a misspelt name in a
YAML recipe would be ignored silently. The planner calls ``validate_inputs`` before it
plans any tensor; from there we look up the configuration it is planning (the caller's
``MergePlanner``) and reject names the method does not know.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Iterable, Iterator, Set

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError
from typing_extensions import Annotated

from mergekit_metagpt.errors import MetaGPTError


def _non_negative_number(value: Any) -> float:
    try:
        number = float(value)
        ok = not isinstance(value, bool) and math.isfinite(number) and number >= 0.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise PydanticCustomError(
            "metagpt_lambda",
            "MetaGPT: parameter lambda must be a finite number >= 0",
        )
    return number


NonNegativeFloat = Annotated[float, BeforeValidator(_non_negative_number)]


def _density(value: Any) -> float:
    try:
        number = float(value)
        ok = not isinstance(value, bool) and 0.0 < number <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise PydanticCustomError(
            "metagpt_density", "MetaGPT: parameter density must be a number in (0, 1]"
        )
    return number


Density = Annotated[float, BeforeValidator(_density)]


def planned_config(max_depth: int = 12):
    """The MergeConfiguration of the MergePlanner calling us, if there is one."""
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if type(owner).__name__ == "MergePlanner" and hasattr(owner, "config"):
            return owner.config
        frame = frame.f_back
    return None


def _parameter_names(node: Any, seen: Set[int]) -> Iterator[str]:
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
        for field in type(node).model_fields:
            value = getattr(node, field, None)
            if field == "parameters" and isinstance(value, dict):
                yield from value.keys()
            elif value is not None and field != "parameters":
                yield from _parameter_names(value, seen)


def check_parameter_names(config, method_name: str, known: Iterable[str]) -> None:
    if config is None or getattr(config, "merge_method", None) != method_name:
        return
    known = set(known)
    unknown = sorted(set(_parameter_names(config, set())) - known)
    if unknown:
        raise MetaGPTError(
            f"Unknown parameter(s) for {method_name}: {', '.join(unknown)} "
            f"(it takes: {', '.join(sorted(known)) or 'none'})"
        )
