"""Parameter types of the MetaGPT methods (checked by mergekit when it resolves them).

Checks of the recipe as a whole (unknown names, shared parameters given per model, and
every value against these types before mergekit resolves it) are in ``recipe_checks``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Callable, Optional

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError


def _number_in(value: Any, accept: Callable[[float], bool]) -> Optional[float]:
    """``value`` as a float if it is a number (not a bool) that `accept` takes, else None;
    -0.0 comes back as 0.0."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond float's range
        return None
    return number + 0.0 if not isinstance(value, bool) and accept(number) else None


def _checked(code: str, rule: str, accept: Callable[[float], bool]):
    """A pydantic type: a float that `accept` takes, else the error `rule`."""
    def check(value: Any) -> float:
        number = _number_in(value, accept)
        if number is None:
            raise PydanticCustomError(code, rule)
        return number

    return Annotated[float, BeforeValidator(check)]


FLOAT32_MAX = 3.4028234663852886e38  # larger λ scales cannot multiply a float32 tensor

NonNegativeFloat = _checked("metagpt_lambda",
                            "MetaGPT: parameter lambda must be a number in [0, 3.4e38]",
                            lambda x: math.isfinite(x) and 0.0 <= x <= FLOAT32_MAX)
Density = _checked("metagpt_density", "MetaGPT: parameter density must be a number in (0, 1]",
                   lambda x: 0.0 < x <= 1.0)

ALPHA_RULE = "MetaGPT: parameter alpha must be a number in [0, 1]"


def alpha_number(value: Any) -> Optional[float]:
    """``value`` as a tempering exponent in [0, 1], or None if it is not one."""
    return _number_in(value, _alpha_ok)


def _alpha_ok(number: float) -> bool:
    return 0.0 <= number <= 1.0


Alpha = _checked("metagpt_alpha", ALPHA_RULE, _alpha_ok)
