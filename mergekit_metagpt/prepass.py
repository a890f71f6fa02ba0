"""The streaming pre-pass: squared task-vector norms over exactly what a merge reads.

For a graph merge (``mergekit-yaml``, ``run_merge``, ``mergekit-multi``,
``mergekit-pytorch``), the first MetaGPT task that executes computes the norms of
the whole ``MergeRun``: for every planned output tensor of every merge set, and each
model of that set, ‖θ_t − θ₀‖² of the two tensors the task reads, read through the
plan's own leaf load tasks (so slices, aliases, tied names, dtypes and the device
are mergekit's). One tensor of the base and one of a model are in memory at a time
(a whole tensor only for ``lambda_from: sparse``). Reads go in the base's shard
order; on CPU, safetensors shards are closed after each tensor so that mapped pages
do not pile up in RSS (``.bin`` shards stay loaded: unpickling them costs).

Vocabulary tensors whose shapes differ only along mergekit's ``vocabulary_axis``
count their leading ``min(rows)`` rows, which base and model both have, with a
warning on every run. Dense norms are memoized in process and cached on disk per
(base, model) checkpoint pair and per read; ``lambda_from: sparse`` norms are
computed afresh in each merge (DARE's masks are random).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Tuple

import torch

from mergekit_metagpt.coefficients import Coefficients
from mergekit_metagpt.errors import MetaGPTError
from mergekit_metagpt.norms import BASE, NormAccumulator, Sparsifier, base_check, squared_delta
from mergekit_metagpt.plan_inputs import TensorRead, task_reads
from mergekit_metagpt.scratch import thread_scratch

LOG = logging.getLogger("mergekit_metagpt")


class PrepassStats:
    """Counters for tests and benchmarks."""

    def __init__(self):
        self.runs = 0  # pre-passes that read tensors
        self.cache_hits = 0  # (base, model) pairs whose every read came from memo or cache
        self.tensors_read = 0
        self.bytes_read = 0
        self.seconds = 0.0
        self.devices: List[str] = []  # device of each pre-pass that read tensors


STATS = PrepassStats()

# -- in-process memo (same keys as the disk cache) -----------------------------------
_MEMO: Dict[Tuple[str, str], Tuple[Dict[str, Optional[float]], Dict[str, str]]] = {}
_MEMO_LOCK = threading.Lock()


def clear_memo() -> None:
    with _MEMO_LOCK:
        _MEMO.clear()


def _known(base_key: str, model_key: str):
    from mergekit_metagpt import norm_cache

    if not norm_cache.enabled():
        return {}, {}
    with _MEMO_LOCK:
        hit = _MEMO.get((base_key, model_key))
    if hit is None:
        hit = norm_cache.load(base_key, model_key) or ({}, {})
        with _MEMO_LOCK:
            _MEMO[(base_key, model_key)] = hit
    return dict(hit[0]), dict(hit[1])


def _remember(base_key, model_key, norms, notes, labels) -> None:
    from mergekit_metagpt import norm_cache

    if not norm_cache.enabled():
        return
    with _MEMO_LOCK:
        _MEMO[(base_key, model_key)] = (dict(norms), dict(notes))
    norm_cache.store(base_key, model_key, norms, notes, labels=labels)


# -- results ------------------------------------------------------------------------
@dataclass
class SetNorms:
    """Norms of one merge set: per model, one value per task (None: not counted)."""

    merge_set: object
    per_task: Dict[Hashable, List[Optional[float]]]
    notes: List[str] = field(default_factory=list)
    sparse: bool = False

    @property
    def coefficients(self) -> Coefficients:
        return Coefficients.from_norms(
            {m: float(sum(v for v in self.per_task[m] if v is not None)) for m in self.merge_set.models}
        )

    def task_lambdas(self, index: int) -> Dict[Hashable, float]:
        """λ from one task's own norms (granularity: per_tensor)."""
        values = {m: self.per_task[m][index] or 0.0 for m in self.merge_set.models}
        return Coefficients.from_norms(values).lambdas


@dataclass
class RunNorms:
    sets: List[SetNorms]

    def of(self, merge_set) -> SetNorms:
        return next(s for s in self.sets if s.merge_set is merge_set)


def _is_sparse(task) -> bool:
    return dict(task.parameters.items()).get("lambda_from") == "sparse"


def _sparsifier(task, method) -> Optional[Sparsifier]:
    if not _is_sparse(task) or method is None or not method.delegate_name:
        return None
    params = dict(task.parameters.items())
    delegate = method.delegate()
    densities = {
        model: dict(task.input_parameters[model].items()).get("density", 1.0)
        for model in task.model_order if model != task.base_model
    }
    return Sparsifier(
        method=delegate.sparsification_method,
        rescale=bool(params.get("rescale", delegate.default_rescale)),
        by_model=densities,
    )


def _vocab_rows(read: TensorRead, base_read: TensorRead, axis, tensor, base_tensor):
    """(tensor, base tensor) narrowed to the rows both have, and a note; or raise."""
    if tensor.shape == base_tensor.shape:
        return tensor, base_tensor, None
    same_rank = tensor.dim() == base_tensor.dim()
    if axis is not None and same_rank and axis < tensor.dim() and all(
        a == b for i, (a, b) in enumerate(zip(tensor.shape, base_tensor.shape)) if i != axis
    ):
        rows = min(tensor.shape[axis], base_tensor.shape[axis])
        note = (
            f"{read.name} ({read.model}: {tensor.shape[axis]} rows, base "
            f"{base_tensor.shape[axis]}): the leading {rows} rows counted"
        )
        return tensor.narrow(axis, 0, rows), base_tensor.narrow(axis, 0, rows), note
    raise MetaGPTError(
        f"MetaGPT: shape mismatch for tensor {read.name!r}: model {read.model} has "
        f"{tuple(tensor.shape)}, base model {base_read.model} has {tuple(base_tensor.shape)}"
    )


def run_norms(run, device: torch.device, method=None) -> RunNorms:
    """The run's norms, computed by the first caller (others wait), then reused."""
    with run.lock:
        if run.result is None:
            run.result = compute(run, torch.device(device), method)
            _announce(run)
        return run.result


def _announce(run) -> None:
    from mergekit_metagpt.record import write_record

    count = len(run.result.sets)
    for number, set_norms in enumerate(run.result.sets, 1):
        which = f", model set {number} of {count}" if count > 1 else ""
        set_norms.coefficients.log(f"{run.method_name}, base {set_norms.merge_set.base}{which}")
        if set_norms.notes:
            LOG.warning(
                "MetaGPT: %d vocabulary tensor(s) differ in size from the base; their "
                "norms count the rows both have: %s", len(set_norms.notes), "; ".join(set_norms.notes),
            )
    write_record(run)


def compute(run, device: torch.device, method=None) -> RunNorms:
    """Norms of every merge set of `run` (see the module docstring)."""
    from mergekit_metagpt.fingerprint import checkpoint_key

    reads: Dict[int, Dict[Hashable, TensorRead]] = {}
    ckpt_keys: Dict[Hashable, str] = {}
    for merge_set in run.sets.values():
        for task in merge_set.tasks:
            reads[id(task)] = task_reads(task)
            for model, read in reads[id(task)].items():
                if model not in ckpt_keys:
                    ckpt_keys[model] = checkpoint_key(read.loader.index)

    # What each (task, model) needs, and what the memo or the cache already holds.
    known: Dict[Tuple[Hashable, Hashable], Tuple[dict, dict]] = {}
    wanted: Dict[Tuple[Hashable, Hashable], set] = {}
    todo: Dict[int, Tuple[object, List[Hashable]]] = {}
    sparse_any = False

    def read_key(task, model) -> Optional[str]:
        task_reads_ = reads[id(task)]
        if task.base_model not in task_reads_ or model not in task_reads_:
            return None
        axis = task.output_weight.vocabulary_axis
        return f"{task_reads_[task.base_model].key}|{task_reads_[model].key}|{axis}"

    for merge_set in run.sets.values():
        for task in merge_set.tasks:
            sparse = _is_sparse(task) and method is not None and method.delegate_name is not None
            sparse_any |= sparse
            for model in merge_set.models:
                pair = (task.base_model, model)
                if pair not in known:
                    known[pair] = _known(ckpt_keys.get(task.base_model, ""), ckpt_keys.get(model, ""))
                key = read_key(task, model)
                if key is None:
                    continue
                wanted.setdefault(pair, set()).add(key)
                if sparse or key not in known[pair][0]:
                    todo.setdefault(id(task), (task, []))[1].append(model)

    for pair, keys in wanted.items():
        if keys <= set(known[pair][0]) and not any(
            model == pair[1] for _, models in todo.values() for model in models
        ):
            STATS.cache_hits += 1
            LOG.info("MetaGPT: norms of %s from the norm cache", pair[1])

    fresh: Dict[Tuple[Hashable, Hashable], Dict[str, float]] = {}
    fresh_notes: Dict[Tuple[Hashable, Hashable], Dict[str, str]] = {}
    sparse_values: Dict[Tuple[int, Hashable], float] = {}
    if todo:
        _stream(run, device, method, reads, todo, read_key, fresh, fresh_notes, sparse_values)
        for pair, values in fresh.items():
            norms, notes = known[pair]
            norms.update(values)
            notes.update(fresh_notes.get(pair, {}))
            _remember(ckpt_keys[pair[0]], ckpt_keys[pair[1]], norms, notes, labels=pair)

    sets = []
    for merge_set in run.sets.values():
        per_task = {m: [] for m in merge_set.models}
        notes: List[str] = []
        for task in merge_set.tasks:
            sparse = _is_sparse(task) and method is not None and method.delegate_name is not None
            for model in merge_set.models:
                key = read_key(task, model)
                if key is None:
                    per_task[model].append(None)
                    continue
                norms, task_notes = known[(task.base_model, model)]
                value = sparse_values.get((id(task), model)) if sparse else norms.get(key)
                per_task[model].append(value)
                if key in task_notes:
                    notes.append(task_notes[key])
        sets.append(SetNorms(merge_set, per_task, notes, sparse=sparse_any))
    return RunNorms(sets)


def _stream(run, device, method, reads, todo, read_key, fresh, fresh_notes, sparse_values) -> None:
    from mergekit_metagpt.progress import progress_bar

    scratch = thread_scratch()
    release = device.type == "cpu"
    accumulator = NormAccumulator([BASE], {})
    base_checked = set()
    order = sorted(
        todo.values(), key=lambda item: reads[id(item[0])][item[0].base_model].order()
        if item[0].base_model in reads[id(item[0])] else ("", "")
    )
    quiet = bool(getattr(run.options, "quiet", False))
    started = time.perf_counter()
    STATS.runs += 1
    STATS.devices.append(str(device))
    models = {m for _, ms in order for m in ms}
    LOG.info(
        "MetaGPT pre-pass: reading %d planned tensors of the base and %d model(s) on %s",
        len(order), len(models), device,
    )
    done = set()  # dense (pair, read key) already computed: a layer read twice counts twice, read once
    with progress_bar(total=len(order), desc="MetaGPT norm pre-pass", quiet=quiet) as bar:
        for task, task_models in order:
            task_reads_ = reads[id(task)]
            base_read = task_reads_[task.base_model]
            base_tensor = base_read.load()
            if base_tensor is None:
                raise MetaGPTError(
                    f"MetaGPT: the base model {task.base_model} has no tensor "
                    f"{base_read.name!r}, which model(s) "
                    f"{', '.join(str(m) for m in task_models)} have"
                )
            base_tensor = base_tensor.to(device)
            STATS.tensors_read += 1
            STATS.bytes_read += base_tensor.nbytes
            bar.update(1, nbytes=base_tensor.nbytes)
            if not base_tensor.is_floating_point():
                for model in task_models:
                    key = read_key(task, model)
                    fresh.setdefault((task.base_model, model), {})[key] = None
                continue
            check_key = (task.base_model, base_read.key)
            if check_key not in base_checked:
                base_checked.add(check_key)
                accumulator.add(BASE, check_key, base_check(base_tensor, scratch), name=base_read.name)
                accumulator.labels.setdefault(BASE, f"the base model {task.base_model}")
            sparsifier = _sparsifier(task, method)
            for model in task_models:
                key = read_key(task, model)
                pair = (task.base_model, model)
                if sparsifier is None and (pair, key) in done:
                    continue
                read = task_reads_[model]
                tensor = read.load()
                if tensor is None:  # an optional tensor this model lacks
                    fresh.setdefault(pair, {})[key] = None
                    continue
                tensor = tensor.to(device)
                STATS.tensors_read += 1
                STATS.bytes_read += tensor.nbytes
                bar.update(0, nbytes=tensor.nbytes)
                if not tensor.is_floating_point():
                    raise MetaGPTError(
                        f"MetaGPT: tensor {read.name!r} of model {model} is {tensor.dtype}, "
                        f"but floating point in the base model {task.base_model}"
                    )
                x, b, note = _vocab_rows(read, base_read, task.output_weight.vocabulary_axis, tensor, base_tensor)
                value = squared_delta(x, b, sparsifier, model, scratch)
                slot = (id(task), model) if sparsifier is not None else (pair, key)
                accumulator.add(model, slot, value, name=read.name)
                accumulator.labels.setdefault(model, f"model {model}")
                if sparsifier is None:
                    done.add((pair, key))
                    if note:
                        fresh_notes.setdefault(pair, {})[key] = note
                del tensor, x, b
            del base_tensor
            if release:
                for read in task_reads_.values():
                    loader = read.loader
                    if loader.index.is_safetensors:
                        loader.flush()
    values = accumulator.finish()
    values.pop(BASE, None)
    for model, by_slot in values.items():
        for slot, value in by_slot.items():
            if isinstance(slot[0], int):  # sparse: (task id, model)
                sparse_values[slot] = value
            else:
                pair, key = slot
                fresh.setdefault(pair, {})[key] = value
    STATS.seconds += time.perf_counter() - started
