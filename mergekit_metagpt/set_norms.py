"""The pre-pass's results: per merge set, each model's squared norm per task and the
inner products per pair of models (``SetNorms``), and their λ."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Tuple

from mergekit_metagpt.coefficients import Coefficients


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: An inner product the pre-pass did not compute (the norms came from the cache of a
#: run that did not compute it); ``None`` is one that does not count (e.g. a tensor
#: one of the models lacks, or a task whose λ come from sparsified vectors).
MISSING = _Missing()


@dataclass
class SetNorms:
    """Norms of one merge set: per model, one value per task (None: not counted)."""

    merge_set: object
    per_task: Dict[Hashable, List[Optional[float]]]
    sparse: bool = False
    #: per pair of models (in the set's order), ⟨δ_a, δ_b⟩ per task: a float, None (not
    #: counted) or MISSING (not computed)
    per_pair: Dict[Tuple[Hashable, Hashable], list] = field(default_factory=dict)

    @functools.cached_property
    def coefficients(self) -> Coefficients:
        """Computed once: every tensor of a merge asks for them."""
        return Coefficients.from_norms(
            {m: float(sum(v for v in self.per_task[m] if v is not None)) for m in self.merge_set.models},
            self.merge_set.alpha,
        )

    @functools.cached_property
    def stats(self):
        """Cosine similarities, ‖δ‖² per layer, largest tensors (``similarity.SetStats``)."""
        from mergekit_metagpt.similarity import set_stats

        return set_stats(self)

    def task_lambdas(self, index: int) -> Dict[Hashable, float]:
        """λ from one task's own norms (granularity: per_tensor); 0 for a model whose
        tensor does not count (e.g. it lacks an optional tensor: the merge leaves it out)."""
        values = {m: self.per_task[m][index] for m in self.merge_set.models}
        lambdas = Coefficients.from_norms(
            {m: v for m, v in values.items() if v is not None}, self.merge_set.alpha
        ).lambdas
        return {m: lambdas.get(m, 0.0) for m in self.merge_set.models}


@dataclass
class RunNorms:
    sets: List[SetNorms]

    def of(self, merge_set) -> SetNorms:
        return next(s for s in self.sets if s.merge_set is merge_set)

    @property
    def merging(self) -> List[SetNorms]:
        """The sets that merge models into their base: the ones with λ."""
        return [s for s in self.sets if s.merge_set.models]

    @property
    def passed_through(self) -> List[SetNorms]:
        """Sets of the base alone (a frankenmerge's slice with only the base): their
        tensors are the base's, with no λ."""
        return [s for s in self.sets if not s.merge_set.models]
