"""Squared task-vector norms, accumulated in float32 per tensor and float64 overall."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Hashable, List, Mapping, Optional, Sequence

import torch

from mergekit_metagpt.errors import MetaGPTError
from mergekit_metagpt.scratch import Scratch, chunks, thread_scratch


@dataclass(frozen=True)
class Sparsifier:
    """mergekit's own sparsification of a task vector, for λ from sparsified vectors:
    the delegate's method, its rescaling, and each model's density for one tensor."""

    method: object
    rescale: bool
    by_model: Mapping[Hashable, float]

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
    base: torch.Tensor,
    sparsifier: Optional[Sparsifier] = None,
    model: Hashable = None,
    scratch: Optional[Scratch] = None,
) -> torch.Tensor:
    """‖tensor − base‖² as a 0-d float32 tensor on the tensors' device (no host sync).

    Summed pairwise (torch's reduction), not with a float32 dot: over tens of millions
    of elements a dot's running sum loses about 1e-4 relative, the pairwise sum 1e-8.

    With a scratch, the difference is formed chunk by chunk in a reused buffer, so the
    float32 work memory is a chunk, not a tensor. Sparsification needs whole tensors.
    """
    if scratch is None or sparsifier is not None:
        delta = tensor.to(torch.float32) - base.to(torch.float32)
        if sparsifier is not None:
            delta = sparsifier(model, delta)
        return delta.square_().sum()
    return squared_deltas([tensor], base, scratch)[0]


def squared_deltas(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, scratch: Scratch, check_base: bool = False
) -> List[torch.Tensor]:
    """‖x − base‖² for each x of base's shape, in one chunked pass over the base: each
    chunk of the base is turned into float32 once for all of them (on CPU, that
    conversion is the costliest step). 0-d float32 tensors on the base's device.

    With `check_base`, one more value comes last: the sum of the base's elements, finite
    exactly when the base holds no NaN or Inf (short of float32 overflow), at the cost
    of one reduction over chunks already converted.
    """
    b = base.reshape(-1)
    xs = [t.reshape(-1) for t in tensors]
    results = [torch.zeros((), device=b.device) for _ in range(len(xs) + check_base)]
    for start, end in chunks(b.numel()):
        b32 = scratch.flat("base", end - start, b.device).copy_(b[start:end])
        if check_base:
            results[-1].add_(b32.sum())
        delta = scratch.flat("delta", end - start, b.device)
        for x, result in zip(xs, results):
            # a pairwise float32 sum: 1e-8 relative where a float32 dot is off by 1e-4
            result.add_(delta.copy_(x[start:end]).sub_(b32).square_().sum())
    return results


def _chunked_sum_of_squares(numel: int, device: torch.device, fill) -> torch.Tensor:
    """Σ fill(chunk)² over chunks; `fill` returns a float32 scratch buffer we may square."""
    result = torch.zeros((), device=device)
    for start, end in chunks(numel):
        # a pairwise float32 sum: 1e-8 relative where a float32 dot is off by 1e-4
        result.add_(fill(start, end).square_().sum())
    return result


# Key under which the base's own squared norm is accumulated: it is finite exactly
# when the base tensor holds no NaN or Inf, so a bad base is named as such.
BASE = ("__metagpt_base__",)


def base_check(base: torch.Tensor, scratch: Optional[Scratch] = None) -> torch.Tensor:
    """‖base‖², finite exactly when the base tensor holds no NaN or Inf."""
    flat = base.reshape(-1)
    if scratch is None:
        return flat.to(torch.float32).square().sum()
    return _chunked_sum_of_squares(
        flat.numel(),
        flat.device,
        lambda start, end: scratch.flat("base_check", end - start, flat.device).copy_(flat[start:end]),
    )


class NormAccumulator:
    """Per-tensor squared norms of several models' task vectors against one base.

    Values stay on the compute device until `finish`, so a CUDA pre-pass never
    waits on the host between tensors.
    """

    def __init__(self, models: Sequence[Hashable], labels: Optional[Dict[Hashable, str]] = None):
        self.models = list(models)
        self.labels = labels or {}
        self._values: Dict[Hashable, List[torch.Tensor]] = {m: [] for m in self.models}
        self._keys: Dict[Hashable, List[Hashable]] = {m: [] for m in self.models}
        self._names: Dict[Hashable, List[str]] = {m: [] for m in self.models}

    def add(self, model: Hashable, key: Hashable, value: torch.Tensor, name: Optional[str] = None) -> None:
        """Record ‖δ‖² of one tensor; `name` (default: the key) is what errors print."""
        if model not in self._values:
            self.models.append(model)
            self._values[model], self._keys[model], self._names[model] = [], [], []
        self._values[model].append(value)
        self._keys[model].append(key)
        self._names[model].append(str(key) if name is None else name)

    def finish(self) -> Dict[Hashable, Dict[Hashable, float]]:
        """Per model, {key: squared norm}; raises on NaN or Inf (the base's first)."""
        result = {}
        order = sorted(self.models, key=lambda m: m != BASE)  # blame the base first
        for model in order:
            keys = self._keys[model]
            if keys:
                values = torch.stack(self._values[model]).to("cpu", torch.float64)
                bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
                if bad:
                    who = self.labels.get(model, f"model {model}")
                    names = self._names[model]
                    raise MetaGPTError(
                        f"MetaGPT: non-finite values (NaN or Inf) in tensor "
                        f"{names[bad[0]]!r} of {who}"
                        + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else "")
                    )
                result[model] = dict(zip(keys, values.tolist()))
            else:
                result[model] = {}
        return result


def storage_view(tensor: torch.Tensor) -> tuple:
    """Identifies the memory a tensor reads: equal for tensors that share it (tied weights)."""
    return (
        tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
        tuple(tensor.stride()), tensor.dtype, tensor.device,
    )


def in_memory_norms(groups, sparsifier_of=None) -> Dict[Hashable, Dict[str, float]]:
    """Squared norms over every group passed to one in-memory merge call.

    A tensor pair (model's, base's) that shares its memory with a pair already counted
    (tied ``lm_head`` / ``embed_tokens`` of ``nn.Module`` inputs) is the same task
    vector and counts once. `sparsifier_of(group_index)` gives the sparsifier, if any.
    """
    accumulator = NormAccumulator([BASE], {BASE: "the base model"})
    scratch = thread_scratch()
    seen = set()
    for index, group in enumerate(groups):
        base = group.base
        if base is None:
            continue
        name = group.metadata.name or f"group {index}"
        base_tensor = base.tensor.detach()
        base_view = storage_view(base_tensor)
        if (BASE, base_view) not in seen:
            seen.add((BASE, base_view))
            accumulator.add(BASE, name, base_check(base_tensor, scratch))
        sparsifier = sparsifier_of(index) if sparsifier_of else None
        for entry in group.non_base:
            tensor = entry.tensor.detach()
            pair = (entry.id, storage_view(tensor), base_view)
            if pair in seen:
                continue
            seen.add(pair)
            accumulator.add(
                entry.id, name, squared_delta(tensor, base_tensor, sparsifier, entry.id, scratch)
            )
    norms = accumulator.finish()
    del norms[BASE]
    return norms


def total(per_tensor: Dict[str, float]) -> float:
    return float(sum(per_tensor.values()))
