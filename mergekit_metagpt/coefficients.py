"""MetaGPT coefficients from squared task-vector norms, and their log table."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, Hashable, List, Mapping, Tuple

from mergekit_metagpt.errors import MetaGPTError

LOG = logging.getLogger("mergekit_metagpt")

#: A squared norm under this is within reach of float32's underflow (squares below about
#: 1e-38 lose digits, below 1e-45 vanish): the pre-pass sums squares in float32 chunks.
TINY_SQUARED_NORM = 1e-30


@dataclass(frozen=True)
class Coefficients:
    """λ_t = ‖δ_t‖² / Σ_k ‖δ_k‖² for each model, in input order; with the tempering
    exponent ``alpha``, λ_t = (‖δ_t‖²)^α / Σ_k (‖δ_k‖²)^α (α = 1: the paper; α = 0: the
    plain average of the fine-tunes)."""

    squared_norms: Tuple[Tuple[Hashable, float], ...]
    alpha: float = 1.0

    @classmethod
    def from_norms(cls, squared_norms: Mapping[Hashable, float], alpha: float = 1.0) -> "Coefficients":
        return cls(tuple((key, float(value)) for key, value in squared_norms.items()), float(alpha))

    @property
    def total(self) -> float:
        return sum(value for _, value in self.squared_norms)

    @property
    def all_zero(self) -> bool:
        return self.total == 0.0

    @property
    def lambdas(self) -> Dict[Hashable, float]:
        """Raises for a squared norm that is not finite (a sum past float64's range): its λ
        would be NaN, or 0 for every model, and the merge NaN or the base."""
        for key, value in self.squared_norms:
            if not math.isfinite(value):
                raise MetaGPTError(
                    f"MetaGPT: model {key}'s squared task-vector norm is {value} (its tensors' ‖δ‖² sum "
                    f"past float64's largest number, 1.8e308: weights that differ from the base's by more "
                    f"than about 1e154, which no fine-tune does, or a norm cache entry that holds such "
                    f"values; MERGEKIT_METAGPT_CACHE=0 computes them afresh)")
        if self.all_zero:
            return {key: 0.0 for key, _ in self.squared_norms}
        # x ** 1.0 == x exactly; 0.0 ** 0 == 1: at alpha 0 a model equal to the base
        # counts in the average
        powers = [value ** self.alpha for _, value in self.squared_norms]
        total = sum(powers)
        if not math.isfinite(total):  # finite norms whose sum is not: shares of the largest
            top = max(powers)
            powers = [power / top for power in powers]
            total = sum(powers)
        return {key: power / total for (key, _), power in zip(self.squared_norms, powers)}

    def table(self) -> str:
        """A plain-text table of model, ‖δ‖² and λ."""
        rows = [[str(key), f"{value:.6e}", f"{lam:.6f}"] for (key, value), lam in zip(
            self.squared_norms, self.lambdas.values()
        )]
        return text_table(["model", "||delta||^2", "lambda"], rows)

    def log(self, context: str = "", tiny_exact: bool = False) -> None:
        """The table at INFO, and a WARNING for a model equal to the base, every model equal
        to it, or (unless `tiny_exact`: such norms were summed again in float64, as in memory)
        a task vector too small for float32 squares."""
        parts = ([context] if context else []) + ([f"alpha {self.alpha:g}"] if self.alpha != 1.0 else [])
        where = f" ({', '.join(parts)})" if parts else ""
        LOG.info("MetaGPT coefficients%s:\n%s", where, self.table())
        if self.all_zero:
            LOG.warning(
                "MetaGPT: every task vector is zero (all models equal the base); "
                "the output is the base model"
            )
        else:
            for key, value in self.squared_norms:
                if value == 0 and self.alpha > 0:  # alpha 0: the plain average, λ 1/T
                    LOG.warning("MetaGPT: model %s equals the base (its task vector is zero): "
                                "λ 0, it adds nothing to the merge", key)
                elif 0 < value < TINY_SQUARED_NORM and self.alpha > 0 and not tiny_exact:  # alpha 0: λ 1/T, exact
                    LOG.warning("MetaGPT: model %s's task vector is tiny (||delta||^2 = %.3e): the "
                                "squares of its elements are summed in float32, which loses them "
                                "below about 1e-38, so its norm, and the λ, may be inexact", key, value)



def scale_values(value) -> List[float]:
    """The recipe's ``lambda`` (one value, or the values a set's tensors take) as floats."""
    return [float(v) for v in (value if isinstance(value, list) else [value])]


def scale_given(value) -> str:
    """The recipe's ``lambda`` (one value, or the values a set's tensors take) as said in
    a line ("0.5", "0.2, 1 by tensor", "from 0.2 to 1 by tensor"); empty where it is 1."""
    values = scale_values(value)
    if all(v == 1.0 for v in values):
        return ""
    if len(values) > 4:  # a gradient: its range
        return f"from {min(values):g} to {max(values):g} by tensor"
    return ", ".join(f"{v:g}" for v in values) + (" by tensor" if len(values) > 1 else "")


def scale_note(value, ascii: bool = False) -> str:
    """The recipe's ``lambda`` (one value, or the values a set's tensors take), where it is
    not 1: the λ listed are shares, which it scales. Empty where it is 1."""
    given = scale_given(value)
    if not given:
        return ""
    if ascii:
        return f"lambda: {given} (the recipe's scale): the merge adds lambda x lambda_t x delta_t"
    return f"`lambda: {given}` (the recipe's scale): the merge adds lambda · λ_t · δ_t, not λ_t · δ_t"


def formula(alphas=(1.0,), ascii: bool = False) -> str:
    """How λ are computed, for logs, cards and reports: the paper's closed form, or the
    tempered one with the ``alpha`` values given (one per model set)."""
    distinct = sorted({float(a) for a in alphas}) or [1.0]
    if distinct == [1.0]:
        return ("lambda_t = ||delta_t||^2 / sum_k ||delta_k||^2" if ascii
                else "λ_t = ‖δ_t‖² / Σ_k ‖δ_k‖²")
    values = ", ".join(f"{a:g}" for a in distinct)
    if ascii:
        return f"lambda_t = (||delta_t||^2)^alpha / sum_k (||delta_k||^2)^alpha, alpha = {values}"
    return f"λ_t = (‖δ_t‖²)^α / Σ_k (‖δ_k‖²)^α, α = {values}"


def text_table(header, rows) -> str:
    """Left-aligned plain-text columns under a dashed rule, aligned as a terminal shows them
    (a CJK character or an emoji takes two columns)."""
    from mergekit_metagpt.errors import printable

    rows = [[printable(" ".join(str(c).splitlines())) for c in row] for row in [header, *rows]]
    table, rows = rows, rows[1:]
    widths = [max(_columns(r[i]) for r in table) for i in range(len(header))]

    def line(cells):
        return "  ".join(c + " " * (w - _columns(c)) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(table[0]), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _columns(text: str) -> int:
    """How many terminal columns `text` takes: wide (CJK) and full-width characters two,
    combining marks none."""
    import unicodedata

    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)
