"""Parameter types of the MetaGPT methods (checked by mergekit when it resolves them).

Checks of the recipe as a whole (unknown names, shared parameters given per model) are
in ``recipe_checks``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError
from typing_extensions import Annotated



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


ALPHA_RULE = "MetaGPT: parameter alpha must be a number in [0, 1]"


def alpha_number(value: Any) -> Optional[float]:
    """``value`` as a tempering exponent in [0, 1], or None if it is not one."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    # + 0.0: -0.0 becomes 0.0
    return number + 0.0 if not isinstance(value, bool) and 0.0 <= number <= 1.0 else None


def _alpha(value: Any) -> float:
    number = alpha_number(value)
    if number is None:
        raise PydanticCustomError("metagpt_alpha", ALPHA_RULE)
    return number


Alpha = Annotated[float, BeforeValidator(_alpha)]
