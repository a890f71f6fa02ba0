"""Squared task-vector norms and inner products: float32 sums per chunk (float64 for float64
tensors, `work_dtype`), added in float64."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

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
    wide: bool = False,
) -> torch.Tensor:
    """‖tensor − base‖² as a 0-d float64 tensor on the tensors' device (no host sync);
    with `wide`, in float64 throughout (`in_memory_norms`' second pass).

    Summed by `canonical_squared_sum`, as every norm: the same bits on a device however it is read.

    With a scratch, the difference is formed chunk by chunk in a reused buffer, so the
    float32 work memory is a chunk, not a tensor. Sparsification needs whole tensors.
    """
    if scratch is None or sparsifier is not None:
        work = torch.float64 if wide else work_dtype(tensor, base)
        delta = tensor.to(work) - base.to(work)
        if sparsifier is not None:
            delta = sparsifier(model, delta)
        return canonical_squared_sum(delta.reshape(-1))
    return task_vector_sums([tensor], base, scratch, wide=wide)[0][0]


def work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 where a tensor is float64: a float64 checkpoint's task vector
    may lie below float32's resolution at its weights' size (δ ~ 1e-9 of weights ~ 1
    vanishes in float32), and its merge is float64 too."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def squared_deltas(tensors: Sequence[torch.Tensor], base: torch.Tensor, scratch: Scratch) -> List[torch.Tensor]:
    """‖x − base‖² for each x of base's shape (see `task_vector_sums`)."""
    return task_vector_sums(tensors, base, scratch)[0]


#: Elements per block of the norms' and the Gram products' float32 sums, then added in
#: float64 (norms within 5e-8 relative of float64 over 16M elements; fewer, larger
#: blocks cost less per batched product: 1024 was the fastest of 256-4096).
GRAM_BLOCK = 1024


def canonical_squared_sum(values: torch.Tensor) -> torch.Tensor:
    """Σ values² of a 1-d tensor (squared in place), a 0-d float64 tensor: per chunk
    (`chunks`), float32 sums (float64 for float64 values) over blocks of ``GRAM_BLOCK``
    elements, each one row of a row-wise sum, the chunk's block sums added in float64, the
    chunks' in order.

    The one reduction of every task vector's norm, so that a norm has the same bits on a
    device whichever way it is read: alone or beside other models (the Gram matrix's
    diagonal changes in its last bits with the number of rows stacked; `task_vector_sums`
    sums each model in its own precision), a chunk at a time or the whole tensor at once
    (sparsified vectors), on any number of threads (a row is never split between threads,
    where torch's sum of a whole vector is). The norm cache keeps one value per (base,
    model), so λ would otherwise depend on which recipe filled it, and on the thread count.
    A GPU's chunks and kernels are its own: its bits may differ from the CPU's.
    """
    values = values.contiguous()
    result = torch.zeros((), dtype=torch.float64, device=values.device)
    for start, end in chunks(values.numel(), values.device):
        result.add_(_chunk_squared_sum(values[start:end]))  # one addition per chunk, as `task_vector_sums`'
    return result


def _chunk_squared_sum(part: torch.Tensor) -> torch.Tensor:
    """`canonical_squared_sum` of one chunk (1-d, contiguous, squared in place), not yet
    added to anything: 0-d float64."""
    whole = part.numel() // GRAM_BLOCK * GRAM_BLOCK
    total = part.square_()[:whole].view(-1, GRAM_BLOCK).sum(1).sum(dtype=torch.float64)
    if whole < part.numel():
        total = total + part[whole:].sum().to(torch.float64)
    return total


def task_vector_sums(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    scratch: Scratch,
    check_base: bool = False,
    pairs: Sequence[Tuple[int, int]] = (),
    wide: bool = False,
) -> Tuple[List[torch.Tensor], List[torch.Tensor], Optional[torch.Tensor]]:
    """One chunked pass over the base for several tensors x_i of its shape:
    (‖x_i − base‖² for each i, ⟨x_i − base, x_j − base⟩ for each (i, j) of `pairs`,
    and with `check_base` the sum of the base's elements, else None). 0-d float64
    tensors on the base's device.

    Each chunk of the base is turned into float32 (`work_dtype`: float64 where a tensor is
    float64, or with `wide`: `in_memory_norms`' second pass) once for all tensors (on CPU, that conversion is
    the costliest step). Each norm is `canonical_squared_sum`'s (float32 sums over blocks
    of ``GRAM_BLOCK`` elements, added in float64: 1e-8 relative over tens of millions of
    elements, where one float32 dot is off by 1e-4), the same bits with or without pairs.
    With pairs, the chunk's deltas are stacked and the inner products taken from their
    Gram matrix, on CPU by blocks of ``GRAM_BLOCK`` elements, one batched matrix product
    read once, the blocks' float32 sums added in float64 (the same precision, measured),
    where the CPU's float32 matrix products are exact (`exact_cpu_matmul`); elsewhere by
    elementwise products and pairwise sums (an inner product's last bits may thus depend
    on the models read beside it; λ do not use them). Sums over chunks are float64. The
    base's sum is finite exactly when it holds no NaN or Inf (short of float32 overflow).
    """
    b = base.reshape(-1)
    xs = [t.reshape(-1) for t in tensors]
    device = b.device
    norms = [torch.zeros((), dtype=torch.float64, device=device) for _ in xs]
    gram = torch.zeros((len(xs), len(xs)), dtype=torch.float64, device=device) if pairs else None
    base_sum = torch.zeros((), dtype=torch.float64, device=device) if check_base else None
    # matrix products only where they are exact float32 (on a GPU, or with a lowered
    # float32 matmul precision, they may round through TF32 or bf16); asked only where
    # there are pairs
    work = torch.float64 if wide else work_dtype(base, *tensors)
    # each norm in its own model's precision, as read alone: a float64 model read beside
    # float32 ones makes the shared work float64; their differences, rounded back to
    # float32, are the float32 differences to the bit (53 ≥ 2·24 + 2 bits)
    own = [work if wide else work_dtype(base, t) for t in tensors]
    fast_gram = gram is not None and device.type == "cpu" and exact_cpu_matmul()
    for start, end in chunks(b.numel(), device):
        size = end - start
        b_chunk = scratch.flat("base", size, device, work).copy_(b[start:end])
        if base_sum is not None:
            base_sum.add_(b_chunk.sum())
        if gram is None:  # one delta buffer, squared in place
            delta = scratch.flat("delta", size, device, work)
            for x, result, dtype in zip(xs, norms, own):
                result.add_(_chunk_squared_sum(delta.copy_(x[start:end]).sub_(b_chunk).to(dtype)))
            continue
        stacked = scratch.flat("deltas", len(xs) * size, device, work).view(len(xs), size)
        for row, x in zip(stacked, xs):
            row.copy_(x[start:end]).sub_(b_chunk)
        if fast_gram:
            gram.add_(_block_gram(stacked))
        else:
            gram.add_(_pairwise_gram(stacked, scratch.flat("product", size, device, work)))
        for row, result, dtype in zip(stacked, norms, own):  # the norms as without pairs, to the bit
            result.add_(_chunk_squared_sum(row.to(dtype)))
    products = [gram[i, j] for i, j in pairs] if pairs else []
    return norms, products, base_sum


#: Devices without float64, in which the norms are summed: Apple's GPUs.
NO_FLOAT64 = ("mps",)


def norms_device(device: torch.device) -> torch.device:
    """Where norms are summed for a merge on `device`: there, or on the CPU for a device
    without float64 (``--device mps``: its float64 sums raised a TypeError)."""
    return torch.device("cpu") if device.type in NO_FLOAT64 else device


def on_float64_device(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, copied to the CPU where its device has no float64 (one tensor at a time)."""
    return tensor.cpu() if tensor.device.type in NO_FLOAT64 else tensor


def no_autocast(device_type: str):
    """``torch.autocast`` turned off for the device, or nothing where torch has no autocast
    for it (``mps`` before torch 2.5 raised "unsupported autocast device_type"): nothing is
    cast there to turn off."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def exact_cpu_matmul() -> bool:
    """Whether float32 matrix products on the CPU are plain float32 (not rounded
    through TF32 or bf16), so that the block Gram products are exact.

    Since torch 2.9 the CPU's setting is ``torch.backends.mkldnn.matmul.fp32_precision``
    ("none": the default, "ieee": exact; "tf32", "bf16": lowered), which both the
    per-backend API (``torch.backends.fp32_precision = "tf32"``, as transformers'
    ``enable_tf32`` sets it) and the legacy ``torch.set_float32_matmul_precision``
    write. The legacy getter raises once the new API has been used, so it is asked
    only on a torch without the new setting. Anything unexpected: False (the
    elementwise path, exact whatever the setting).
    """
    try:
        matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
        precision = getattr(matmul, "fp32_precision", None)
        if precision is not None:
            return precision in ("none", "ieee")
        return torch.get_float32_matmul_precision() == "highest"
    except Exception:
        return False


def _block_gram(stacked: torch.Tensor) -> torch.Tensor:
    """Σ over blocks of GRAM_BLOCK columns of the rows' Gram matrix (float32, or float64 for
    float64 rows), in float64. Under a caller's autocast too: it would take the products
    in bfloat16 (relative errors of 1e-5 in the inner products)."""
    rows, size = stacked.shape
    blocks = size // GRAM_BLOCK
    result = torch.zeros((rows, rows), dtype=torch.float64, device=stacked.device)
    with no_autocast(stacked.device.type):
        if blocks:
            batched = stacked[:, : blocks * GRAM_BLOCK].view(rows, blocks, GRAM_BLOCK).transpose(0, 1)
            result.add_(torch.bmm(batched, batched.transpose(1, 2)).sum(0, dtype=torch.float64))
        if blocks * GRAM_BLOCK < size:
            tail = stacked[:, blocks * GRAM_BLOCK:]
            result.add_((tail @ tail.T).to(torch.float64))
    return result


def _pairwise_gram(stacked: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
    """The rows' Gram matrix by elementwise products and torch's pairwise float32 sums."""
    rows = stacked.shape[0]
    result = torch.zeros((rows, rows), dtype=torch.float64, device=stacked.device)
    for i in range(rows):
        for j in range(i + 1, rows):  # no diagonal: the norms are `canonical_squared_sum`'s
            result[i, j] = result[j, i] = torch.mul(stacked[i], stacked[j], out=product).sum()
    return result


def _chunked_sum_of_squares(numel: int, device: torch.device, fill) -> torch.Tensor:
    """Σ fill(chunk)² over chunks (float32 per chunk, or float64, as `fill`'s buffer;
    float64 across); `fill` returns a scratch buffer we may square."""
    result = torch.zeros((), dtype=torch.float64, device=device)
    for start, end in chunks(numel, device):
        # a pairwise float32 sum: 1e-8 relative where a float32 dot is off by 1e-4
        result.add_(fill(start, end).square_().sum())
    return result


# Key under which a value of the base's own is accumulated (the sum of its elements in
# the pre-pass, its squared norm in memory): finite exactly when the base tensor holds
# no NaN or Inf, so a bad base is named as such.
class _BaseKey:
    """The one key of `BASE`: equal to nothing but itself, so no model's id can be it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<the base model>"


BASE = _BaseKey()


def base_check(base: torch.Tensor, scratch: Optional[Scratch] = None) -> torch.Tensor:
    """‖base‖², finite exactly when the base tensor holds no NaN or Inf."""
    flat = base.reshape(-1)
    work = work_dtype(base)
    if scratch is None:
        return flat.to(work).square().sum()
    return _chunked_sum_of_squares(
        flat.numel(),
        flat.device,
        lambda start, end: scratch.flat("base_check", end - start, flat.device, work).copy_(flat[start:end]),
    )


class NormAccumulator:
    """Per-tensor values keyed by model (squared norms of task vectors), by pair (inner
    products) and under ``BASE`` (the bases' check values), for one pre-pass.

    Values stay on the compute device until `finish`, so a CUDA pre-pass never
    waits on the host between tensors.
    """

    def __init__(self, models: Sequence[Hashable], labels: Optional[Dict[Hashable, str]] = None):
        self.models = list(models)
        self.labels = labels or {}
        self._values: Dict[Hashable, List[torch.Tensor]] = {m: [] for m in self.models}
        self._keys: Dict[Hashable, List[Hashable]] = {m: [] for m in self.models}
        self._names: Dict[Hashable, List[str]] = {m: [] for m in self.models}
        self._float16: Dict[Hashable, List[bool]] = {m: [] for m in self.models}

    def add(self, model: Hashable, key: Hashable, value: torch.Tensor, name: Optional[str] = None,
            dtype: Optional[torch.dtype] = None) -> None:
        """Record ‖δ‖² of one tensor; `name` (default: the key) is what errors print, `dtype`
        the tensor's as read (float16 is said: a cast to it turns large values into Inf)."""
        if model not in self._values:
            self.models.append(model)
            self._values[model], self._keys[model], self._names[model] = [], [], []
            self._float16[model] = []
        self._values[model].append(value)
        self._keys[model].append(key)
        self._names[model].append(str(key) if name is None else name)
        self._float16[model].append(dtype == torch.float16)

    def finish(self) -> Dict[Hashable, Dict[Hashable, float]]:
        """Per model, {key: squared norm}; raises on NaN or Inf (the base's first)."""
        result = {}
        order = sorted(self.models, key=lambda m: m is not BASE)  # blame the base first
        for model in order:
            keys = self._keys[model]
            if keys:
                values = _on_cpu(self._values[model])
                bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
                if bad:
                    who = self.labels.get(model, f"model {model}")
                    names = self._names[model]
                    # values are float32 sums (of squares; the pre-pass's base check: of
                    # elements): finite elements of about 1e19 (1e17 over a few million)
                    # overflow them too
                    what = non_finite("NaN or Inf, or values too large for float32 sums" if model is BASE else
                                      "NaN or Inf, or a task vector too large for float32 sums of squares",
                                      self._float16[model][bad[0]])
                    raise MetaGPTError(
                        f"MetaGPT: non-finite values ({what}) in tensor "
                        f"{names[bad[0]]!r} of {who}"
                        + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else "")
                    )
                result[model] = dict(zip(keys, values.tolist()))
            else:
                result[model] = {}
        return result


def non_finite(what: str, float16: bool) -> str:
    """What a non-finite value may be, and for a tensor read as float16 (the file's, or the
    recipe's cast) that the cast of a larger value gives Inf."""
    return what + ("; read as float16, which holds nothing beyond ±65504 (a `dtype: float16` cast of "
                   "larger values gives Inf)" if float16 else "")


def _on_cpu(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """0-d tensors as one float64 CPU vector: stacked on their device when they share
    one (a single copy, one host sync on a GPU), else each moved to the CPU first (an
    in-memory merge may hold some groups on a GPU, others on the CPU)."""
    if len({v.device for v in values}) == 1:
        return torch.stack([v.to(torch.float64) for v in values]).cpu()
    return torch.stack([v.to("cpu", torch.float64) for v in values])


def storage_view(tensor: torch.Tensor) -> tuple:
    """Identifies the memory a tensor reads: equal for tensors that share it (tied weights)."""
    return (
        tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
        tuple(tensor.stride()), tensor.dtype, tensor.device,
    )


#: A model's ‖δ‖² under this, summed in float32 squares, may have lost a part to float32's
#: underflow (squares of |δ| < 1e-19 lose digits, those of |δ| < 3e-23 vanish): at most
#: 1.2e-38 per element, 1e-9 of this for a trillion elements. In memory, such a model's norms
#: are summed again in float64 (`in_memory_norms`).
EXACT_BELOW = 1e-17


def in_memory_norms(groups, sparsifier_of=None, dtype_of=None) -> Dict[Hashable, Dict[int, float]]:
    """Squared norms over every group passed to one in-memory merge call, per model
    {group index: ‖δ‖²}.

    A group whose every tensor, the base's and each model's, shares its memory with the
    same model's tensor of a group already counted, cast to the same dtype and sparsified
    alike (tied ``lm_head`` / ``embed_tokens`` of ``nn.Module`` inputs, every input tied),
    merges to the same tensor, which a tied model holds once: it counts once, as in the
    checkpoint on disk. Where only some inputs share (a tied model beside an untied one),
    or the groups' parameters differ (a `density` of their own), the two merged tensors
    differ and each applies the shared task vector: it counts for each, as a merge of the
    checkpoints counts it.
    `sparsifier_of(group_index)` gives the sparsifier, if any;
    `dtype_of(group_index)` the dtype the merge casts that group's tensors to (its
    ``input_dtypes``: the norms are those of the cast tensors, one tensor at a time), or
    None for none (mergekit then promotes, which changes no value).
    A model whose ‖δ‖² comes out under ``EXACT_BELOW`` (zero included: it equals the base, or
    its task vector is too small for float32 squares) has its norms summed again in float64.
    """
    accumulator = NormAccumulator([BASE], {BASE: "the base model"})
    scratch = thread_scratch()
    for index, name, base_tensor, tensors, sparsifier in _counted_groups(groups, sparsifier_of, dtype_of):
        accumulator.add(BASE, index, base_check(base_tensor, scratch), name=name, dtype=base_tensor.dtype)
        for model, tensor in tensors:
            accumulator.add(  # keyed by position: two groups may share a name
                model, index, squared_delta(tensor, base_tensor, sparsifier, model, scratch),
                name=name, dtype=tensor.dtype,
            )
    norms = accumulator.finish()
    del norms[BASE]
    again = {model for model, values in norms.items() if total(values) < EXACT_BELOW}
    if again:
        _exact_again(norms, again, groups, sparsifier_of, dtype_of, scratch)
    return norms


def _exact_again(norms, again, groups, sparsifier_of, dtype_of, scratch) -> None:
    """The norms of the models `again` summed again in float64, a chunk at a time as the first
    time (no float64 copy of a tensor, bar a sparsified one's delta, which is whole the first
    time too), into `norms`. A second walk over the groups, not a list of the first's tensors:
    cast copies are made a group at a time. mergekit's random sparsification (DARE) draws its
    masks again here, from a forked generator: the caller's generator moves on as after one
    walk, so the merge's masks do not depend on whether some model was summed again."""
    devices = sorted({e.tensor.device.index or 0 for g in groups for e in g.entries if e.tensor.is_cuda})
    with torch.random.fork_rng(devices=devices):
        for index, _name, base_tensor, tensors, sparsifier in _counted_groups(groups, sparsifier_of, dtype_of,
                                                                              only=again):
            for model, tensor in tensors:
                if work_dtype(tensor, base_tensor) != torch.float64:  # float64: summed so already
                    norms[model][index] = float(squared_delta(tensor, base_tensor, sparsifier, model, scratch,
                                                              wide=True))


def _counted_groups(groups, sparsifier_of, dtype_of, only=None):
    """(index, name, base tensor, [(model, tensor)], sparsifier) of each group that counts
    (see `in_memory_norms`), the tensors detached and cast to the group's dtype; with `only`,
    the tensors of those models alone (which groups count does not depend on it)."""
    counted: dict = {}  # the memory a counted group reads, with its cast dtype -> its sparsifiers
    for index, group in enumerate(groups):
        base = group.base
        if base is None:
            continue
        dtype = dtype_of(index) if dtype_of else None
        base_tensor = base.tensor.detach()
        tensors = [(entry.id, entry.tensor.detach()) for entry in group.non_base]
        reads = (dtype, storage_view(base_tensor), frozenset((i, storage_view(t)) for i, t in tensors))
        sparsifier = sparsifier_of(index) if sparsifier_of else None
        if sparsifier in counted.get(reads, ()):  # compared by value (its densities: a dict)
            continue
        counted.setdefault(reads, []).append(sparsifier)

        def cast(tensor, dtype=dtype):
            return on_float64_device(tensor if dtype is None else tensor.to(dtype=dtype))

        yield (index, group.metadata.name or f"group {index}", cast(base_tensor),
               [(model, cast(tensor)) for model, tensor in tensors if only is None or model in only], sparsifier)


def total(per_tensor: Dict[str, float]) -> float:
    return float(sum(per_tensor.values()))
