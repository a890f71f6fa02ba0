"""Squared task-vector norms, accumulated in float32 per tensor and float64 overall."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from mergekit_metagpt.errors import MetaGPTError
from mergekit_metagpt.scratch import Scratch


@dataclass(frozen=True)
class Sparsifier:
    """mergekit's own sparsification of a task vector, for λ from sparsified vectors.

    ``densities`` (sorted (model, density) pairs) is what identifies it in memo keys.
    """

    method: object
    rescale: bool
    densities: Tuple[Tuple[str, float], ...]
    by_model: Dict[Hashable, float] = field(compare=False, hash=False, repr=False)

    def __call__(self, model: Hashable, delta: torch.Tensor) -> torch.Tensor:
        from mergekit.sparsify import RescaleNorm, sparsify

        return sparsify(
            delta,
            density=self.by_model[model],
            method=self.method,
            rescale_norm=RescaleNorm.l1 if self.rescale else None,
        )


def squared_delta(
    tensor: torch.Tensor,
    base32: torch.Tensor,
    sparsifier: Optional[Sparsifier] = None,
    model: Hashable = None,
    scratch: Optional[Scratch] = None,
) -> torch.Tensor:
    """‖tensor − base‖² as a 0-d float32 tensor on the tensors' device (no host sync)."""
    if scratch is not None:
        delta = scratch.get("delta", base32).copy_(tensor).sub_(base32)
    else:
        delta = tensor.to(torch.float32) - base32
    if sparsifier is not None:
        delta = sparsifier(model, delta)
    flat = delta.reshape(-1)
    return torch.dot(flat, flat)


# Key under which the base's own squared norm is accumulated: it is finite exactly
# when the base tensor holds no NaN or Inf, so a bad base is named as such.
BASE = ("__metagpt_base__",)


def base_check(base32: torch.Tensor) -> torch.Tensor:
    flat = base32.reshape(-1)
    return torch.dot(flat, flat)


class NormAccumulator:
    """Per-tensor squared norms of several models' task vectors against one base.

    Values stay on the compute device until `finish`, so a CUDA pre-pass never
    waits on the host between tensors.
    """

    def __init__(self, models: Sequence[Hashable], labels: Optional[Dict[Hashable, str]] = None):
        self.models = list(models)
        self.labels = labels or {}
        self.tensor_names: List[str] = []
        self._values: Dict[Hashable, List[torch.Tensor]] = {m: [] for m in self.models}
        self._names: Dict[Hashable, List[str]] = {m: [] for m in self.models}

    def add(self, model: Hashable, tensor_name: str, value: torch.Tensor) -> None:
        self._values[model].append(value)
        self._names[model].append(tensor_name)

    def finish(self) -> Dict[Hashable, Dict[str, float]]:
        """Per model, {tensor name: squared norm}; raises on NaN or Inf."""
        result = {}
        order = sorted(self.models, key=lambda m: m != BASE)  # blame the base first
        for model in order:
            names = self._names[model]
            if names:
                values = torch.stack(self._values[model]).to("cpu", torch.float64)
                bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
                if bad:
                    who = self.labels.get(model, f"model {model}")
                    raise MetaGPTError(
                        f"MetaGPT: non-finite values (NaN or Inf) in tensor "
                        f"{names[bad[0]]!r} of {who}"
                        + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else "")
                    )
                result[model] = dict(zip(names, values.tolist()))
            else:
                result[model] = {}
        return result


def in_memory_norms(groups, sparsifier: Optional[Sparsifier] = None) -> Dict[Hashable, Dict[str, float]]:
    """Squared norms over every group passed to one in-memory merge call."""
    models: List[Hashable] = [BASE]
    for group in groups:
        for entry in group.non_base:
            if entry.id not in models:
                models.append(entry.id)
    accumulator = NormAccumulator(models, {BASE: "the base model"})
    for index, group in enumerate(groups):
        base = group.base
        if base is None:
            continue
        name = group.metadata.name or f"group {index}"
        base32 = base.tensor.detach().to(torch.float32)
        accumulator.add(BASE, name, base_check(base32))
        for entry in group.non_base:
            accumulator.add(
                entry.id, name, squared_delta(entry.tensor.detach(), base32, sparsifier, entry.id)
            )
        del base32
    norms = accumulator.finish()
    del norms[BASE]
    return norms


def total(per_tensor: Dict[str, float]) -> float:
    return float(sum(per_tensor.values()))
