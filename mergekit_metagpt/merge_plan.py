"""The MetaGPT part of a mergekit merge plan: which tensors each set of models merges.

mergekit's planner makes one ``ExecuteMergeMethodTask`` per output tensor. Its input
task (``GatherTensors``, ``PermutedVocabulary``, ``TensorDictWrapper`` …) already
resolves slices, layer offsets, aliases, tied names and dtypes. A *merge set* is the
set of models merged together (a base and its fine-tunes; one per distinct slice
model set); its λ come from exactly the output tensors that set produces, read
through those input tasks' leaf loads and vocabulary adapters (see ``prepass``). A
``MergeRun`` is one merge: its sets, the norms once computed, and where its record
goes.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Tuple

from mergekit_metagpt.errors import MetaGPTError
from mergekit_metagpt.fork_safety import renew_after_fork

LOG = logging.getLogger("mergekit_metagpt")


def task_parameter(task, name: str, default=None):
    """One of a planned task's resolved parameters (``ExecuteMergeMethodTask.parameters``)."""
    return dict(task.parameters.items()).get(name, default)


@dataclass
class MergeSet:
    """One base and the models merged with it, and the tasks (output tensors) they make."""

    base: Hashable
    models: Tuple[Hashable, ...]
    tasks: List[object] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"base {self.base}, models {', '.join(str(m) for m in self.models)}"

    @functools.cached_property
    def alpha(self) -> float:
        """The tempering exponent of the set's λ: one value for all its tensors (read once
        the plan is complete: ``MergeRun.check``)."""
        return uniform_alpha([task_parameter(t, "alpha", 1.0) for t in self.tasks],
                             self.label)

    @functools.cached_property
    def lambda_from(self) -> str:
        """Which norms give the set's λ (``dense`` or ``sparse``): one value for all its
        tensors, as its λ are one per model over all of them (read once the plan is
        complete: ``MergeRun.check``)."""
        return uniform_lambda_from([task_parameter(t, "lambda_from", "dense") for t in self.tasks],
                                   self.label)


class MergeRun:
    """The MetaGPT tasks of one merge plan, grouped into merge sets."""

    def __init__(self, method_name: str, tasks, context=None, out_path: Optional[str] = None):
        from mergekit_metagpt.integration import RAW_OPTIONS

        self.method_name = method_name
        self.context = context
        #: without run_merge (mergekit-pytorch): the command's options, where it gave them
        self._raw_options = (RAW_OPTIONS.get() or {}).get("options") if context is None else None
        self.out_path = getattr(context, "out_path", None) or out_path
        self.sets: Dict[tuple, MergeSet] = {}
        self._set_of: Dict[int, MergeSet] = {}
        self._index_of: Dict[int, int] = {}
        unread: Dict[Tuple[tuple, tuple], List[str]] = {}  # (named, read) -> tensors
        #: (base, models read) -> tensors whose input gathers no tensor of the base
        self._baseless: Dict[Tuple[Hashable, tuple], List[str]] = {}
        #: id(task) -> what it reads of each model, or why that cannot be known
        self._reads: Dict[int, object] = {}
        from mergekit_metagpt.plan_inputs import task_reads

        #: output tensor name -> (its set, its index there, its signature, its settings, what
        #: it reads; see `_signature`, `_settings`): mergekit 0.1.5 plans
        #: some tensors more than once (Qwen2-VL's projector: layer templates without a layer
        #: index), and writes one of them
        planned: Dict[str, Tuple[MergeSet, int, Optional[tuple], dict, object]] = {}
        self.repeats: List[object] = []  # tasks planned again for a tensor: merged, not counted
        for task in tasks:
            try:
                reads = task_reads(task)
            except MetaGPTError as error:  # raised by `check`, before anything is read
                reads = error
            read = tuple(task.model_order) if isinstance(reads, MetaGPTError) else task_models(task, reads)
            if task.base_model not in read:  # listed, but not read (mergekit's slices quirk)
                self._baseless.setdefault((task.base_model, read), []).append(task.output_weight.name)
                continue
            models = tuple(m for m in read if m != task.base_model)
            key = (task.method_name, task.base_model, frozenset(models))
            merge_set = self.sets.setdefault(key, MergeSet(task.base_model, models))
            self._reads[id(task)] = reads
            self._set_of[id(task)] = merge_set
            name, signature, settings = task.output_weight.name, _signature(reads), _settings(task)
            if name in planned and planned[name][2] is not None and signature is not None:
                first_set, first_index, first_signature, first_settings, first_reads = planned[name]
                if first_set is not merge_set or first_signature != signature:
                    raise MetaGPTError(
                        f"MetaGPT: mergekit plans output tensor {name!r} twice, from other inputs "
                        f"({_inputs(first_set, first_reads)}; and {_inputs(merge_set, reads)}); the "
                        f"merged model would hold whichever it writes last. Check the recipe's modules "
                        f"and slices"
                    )
                differ = sorted(k for k in set(first_settings) | set(settings)
                                if first_settings.get(k) != settings.get(k))
                if differ:  # a gradient takes a value per plan: which is written is mergekit's last
                    raise MetaGPTError(
                        f"MetaGPT: mergekit plans output tensor {name!r} more than once (once per layer of "
                        f"its module), with other values of {', '.join(differ)} ("
                        + "; ".join(f"{k}: {first_settings.get(k)} and {settings.get(k)}" for k in differ)
                        + "): the merged model would hold whichever it writes last. Give it one value for "
                        f"this tensor (a `filter:` matching {name!r})"
                    )
                self._index_of[id(task)] = first_index  # the same tensor again: counted once
                self.repeats.append(task)
                continue
            planned.setdefault(name, (merge_set, len(merge_set.tasks), signature, settings, reads))
            self._index_of[id(task)] = len(merge_set.tasks)
            merge_set.tasks.append(task)
            named = tuple(m for m in task.model_order if m != task.base_model and m not in models)
            if named:
                unread.setdefault((named, models), []).append(task.output_weight.name)
        for (named, models), names in unread.items():
            LOG.warning(
                "MetaGPT: mergekit reads nothing of %s for %s, though the last slice lists %s "
                "(mergekit 0.1.5 plans the tensors after the last slice with as many sources as "
                "the first slice has); %s",
                ", ".join(str(m) for m in named), ", ".join(names[:3]) + (", …" if len(names) > 3 else ""),
                "it" if len(named) == 1 else "them",
                f"they are merged, and their λ taken, over {', '.join(str(m) for m in models)}" if models
                else "they are the base's, passed through",
            )
        self.lock = threading.Lock()
        self.result = None  # set_norms.RunNorms, once computed
        self.error: Optional[BaseException] = None  # why the pre-pass failed, if it did
        self.record_written = False  # whether its record is in the output folder
        #: whether mergekit executes this plan (a merge: each task's inputs, vocabulary
        #: adapters included, run again after the pre-pass ran them); not for the plugin's
        #: commands, which only plan
        self.merge_executes_plan = True
        #: (id of a task, a record) for what mergekit's vocabulary adapter logged while the
        #: pre-pass ran it in a merge (`plan_inputs.root_records_held`): logged if the
        #: pre-pass fails, for the tasks whose inputs mergekit had not run yet
        self.held_records: list = []
        #: ids of the tasks that asked for the norms: mergekit has run their inputs
        self.inputs_run: set = set()
        #: the vocabulary adapters' other inputs (the tokenizer build), computed once for
        #: the pre-pass and the merge (see `plan_inputs.SharedInputs`), and the plan's
        #: tasks of them, which mergekit's executor runs (`register_universe`)
        from mergekit_metagpt.plan_inputs import SharedInputs

        self.shared_inputs = SharedInputs()
        self.shared_input_tasks: list = []
        #: model -> (its checkpoint's index, its fingerprint) when the pre-pass read it
        self.input_keys: Dict[Hashable, tuple] = {}
        #: mergekit's FinalizeModel tasks, after which the plugin's wrapper writes the
        #: record (see `record_at_end`)
        self.finalizers: list = []

    def changed_inputs(self) -> List[Hashable]:
        """The models whose checkpoint files changed since the merge began (``run_merge``
        fingerprints them before mergekit opens any; else the pre-pass, before it reads):
        the merged weights may then mix old and new files, and the λ may be either's."""
        from mergekit_metagpt.fingerprint import changed_since

        return changed_since(self.input_keys)

    @property
    def record_at_end(self) -> bool:
        """The record is written once mergekit has written the model (where the FinalizeModel
        wrapper is in place), so that a merge killed midway (SIGKILL, out of memory), which no
        wrapper outlives, leaves none beside weights it did not write; else when the pre-pass
        ends, the run_merge wrapper removing it if the merge then fails."""
        return bool(self.finalizers)

    @property
    def options(self):
        return getattr(self.context, "options", None) if self.context is not None else self._raw_options

    @property
    def config(self):
        return getattr(self.context, "config", None)

    def set_of(self, task) -> MergeSet:
        return self._set_of[id(task)]

    def index_in_set(self, task) -> int:
        return self._index_of[id(task)]

    def reads_of(self, task) -> dict:
        """What `task` reads of each model (``plan_inputs.task_reads``), computed once per
        plan; raises why where the pre-pass cannot read its inputs."""
        reads = self._reads[id(task)]
        if isinstance(reads, MetaGPTError):
            raise reads
        return reads

    def check(self) -> None:
        """Refuse a plan in which a tensor's inputs lack its base, no set merges any model
        besides its base, a set's tensors are given different ``alpha`` or ``lambda_from``
        (its λ are one per model), a set lists one checkpoint twice, or a file the plan reads is missing
        or damaged; and warn of what a merge may not mean (``tied_reads``, a set spelt apart)."""
        for (base, read), names in self._baseless.items():
            shown = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
            raise MetaGPTError(
                f"MetaGPT: mergekit reads no tensor of the base model {base} for {shown} (it "
                f"reads {', '.join(str(m) for m in read) or 'nothing'}), and a merge needs the "
                f"base (mergekit would stop there: 'Base input is not present'); mergekit 0.1.5 "
                f"reads the tensors after the last slice from the last slice's first sources, as "
                f"many as the first slice has: list the base first in the last slice"
            )
        if self.sets and not any(s.models for s in self.sets.values()):
            bases = sorted({str(s.base) for s in self.sets.values()})
            raise MetaGPTError(
                f"MetaGPT needs at least one model besides the base model {', '.join(bases)}"
            )
        for merge_set in self.sets.values():
            if merge_set.models:  # a set of the base alone uses no alpha
                merge_set.alpha  # noqa: B018  (raises if the set's tensors disagree)
                merge_set.lambda_from  # noqa: B018  (as alpha)
            _refuse_one_checkpoint_twice(merge_set.models, merge_set.base)
        _warn_one_set_spelt_apart(list(self.sets.values()))
        from mergekit_metagpt.checkpoint_files import check_files_open
        from mergekit_metagpt.tied_reads import warn_of_tied_reads

        check_files_open((task.base_model, self.reads_of(task))
                         for merge_set in self.sets.values() for task in merge_set.tasks)
        warn_of_tied_reads(self)


def place(path) -> Optional[tuple]:
    """A mergekit ModelPath as (local folder resolved, else the hub id; revision)."""
    if path is None:
        return None
    local = path.path  # as mergekit reads it: it expands no ~
    return os.path.realpath(local) if os.path.isdir(local) else path.path, getattr(path, "revision", None)


def read_folder(model) -> Optional[str]:
    """The folder mergekit's loader reads `model`'s weights from, resolved (a hub id's
    snapshot folder: ``org/m``, ``org/m@main``, its commit and its snapshot's path are
    one), or None where it has no loader here (the merge then reports why)."""
    try:
        from mergekit.io.tasks import LoaderCache

        return os.path.realpath(LoaderCache().get(model).index.base_path)
    except Exception as error:  # the merge's own loader reports it, with mergekit's words
        LOG.debug("MetaGPT: no loader for %s here (%s): its spelling stands for it", model, error)
        return None


def _checkpoint(model) -> Optional[tuple]:
    """Where a mergekit ModelReference's weights are (``./m/./a`` and ``m/a/`` are one), with
    its LoRA; None for the keys of in-memory merges."""
    if not isinstance(getattr(getattr(model, "model", None), "path", None), str):
        return None
    lora = getattr(model, "lora", None)
    # with a LoRA, the loader's folder is mergekit's merged copy, named after the spelling
    folder = read_folder(model) if lora is None else None
    return ((folder, None) if folder else place(model.model)), place(lora)


def same_folder(a: str, b: str) -> bool:
    """Whether two paths name one existing folder or file: by device and inode, not by their
    resolved strings (on a case-insensitive disk, macOS's or Windows', ``./Tiny/Math`` and
    ``./tiny/math`` are one folder that resolves to two strings)."""
    found = _file_id(a)
    return found is not None and found == _file_id(b)


def _file_id(path: str):
    """(device, inode) of an existing path, or its resolved string where the file system
    gives no inode (0: some network and virtual drives on Windows, where every file would be
    one); None where it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if st.st_ino else os.path.normcase(os.path.realpath(path))


def _identity(key):
    """A `_checkpoint` key with each local folder as its device and inode (`same_folder`)."""
    def one(where):
        if where is None or not os.path.isabs(where[0]):  # a hub id
            return where
        found = _file_id(where[0])
        return where if found is None else (found, where[1])

    return None if key is None else tuple(one(where) for where in key)


def _refuse_one_checkpoint_twice(models, base=None) -> None:
    """Two inputs of a model set that are one checkpoint under two spellings would each get
    a λ (mergekit refuses only the same spelling twice); the base under another spelling
    would be a model with a zero task vector, counted by ``alpha: 0`` (mergekit takes the
    base's own spelling among the models as the base)."""
    base_key = _identity(_checkpoint(base)) if base is not None else None
    seen: Dict[tuple, Hashable] = {}
    for model in models:
        shown = _checkpoint(model)
        key = _identity(shown)
        if key is None:
            continue
        if key == base_key and model != base:
            raise MetaGPTError(
                f"MetaGPT: model {model} is the base model {base} under another spelling "
                f"({shown[0][0]}); write it as the base is written (mergekit then takes it as the "
                f"base) or leave it out: as a model it would get a λ of its own"
            )
        if key in seen and seen[key] != model:
            raise MetaGPTError(
                f"MetaGPT: models {seen[key]} and {model} are one checkpoint ({shown[0][0]}); "
                f"list it once (each listing would get its own λ)"
            )
        seen.setdefault(key, model)


def _warn_one_set_spelt_apart(sets) -> None:
    """Two model sets of one base and models, the checkpoints written otherwise in one
    (``./a/`` in one module or slice, ``./a`` in another): mergekit tells its model sets
    apart by how the paths are written, so each gets λ of its own, over its own tensors,
    where one set would get one λ over all of them. A warning: a merge that means it is
    possible, if unlikely."""
    def checkpoints(merge_set):
        keys = [_identity(_checkpoint(m)) for m in (merge_set.base, *merge_set.models)]
        return None if None in keys else frozenset(keys)

    first: Dict[frozenset, tuple] = {}
    for number, merge_set in enumerate(sets, 1):
        key = checkpoints(merge_set)
        if key is None:
            continue
        if key in first:
            earlier, at = first[key]
            LOG.warning(
                "MetaGPT: model sets %d (%s) and %d (%s) are the same checkpoints written otherwise: "
                "mergekit plans them apart, so each gets λ of its own over its own tensors; write the "
                "paths alike in every slice and module for one λ over all of them", at, earlier.label,
                number, merge_set.label)
        else:
            first[key] = (merge_set, number)


def uniform_alpha(values, where: str) -> float:
    """The one ``alpha`` of a model set, or an error naming the values given."""
    from mergekit_metagpt.parameters import ALPHA_RULE, alpha_number

    numbers = [alpha_number(v) for v in values]
    bad = [v for v, n in zip(values, numbers) if n is None]
    if bad:
        raise MetaGPTError(f"{ALPHA_RULE} ({where}); got {bad[0]!r}")
    return _one_value("alpha", numbers, where, 1.0, show="{:g}".format)


def uniform_lambda_from(values, where: str) -> str:
    """The one ``lambda_from`` of a model set (its λ are one per model, over the norms of
    all its tensors: all of them dense or all sparsified), or an error naming the values."""
    return _one_value("lambda_from", [str(v) for v in values], where, "dense", why=(
        ": its λ are one per model, from the norms of all its tensors, of the task vectors "
        "(dense) or of the sparsified ones (sparse), not a mix"))


def _one_value(name: str, values, where: str, default, show=str, why: str = ""):
    """The one value a parameter takes over all tensors of a model set (`default` where
    none is given), or an error naming the distinct values given."""
    distinct = sorted(set(values))
    if len(distinct) > 1:
        raise MetaGPTError(
            f"MetaGPT: parameter {name} must be one value for all tensors of a model set "
            f"({where}); got {', '.join(show(v) for v in distinct)}{why}"
        )
    return distinct[0] if distinct else default


def _inputs(merge_set: MergeSet, reads) -> str:
    """A planned tensor's inputs for a message: each model and the tensor it reads."""
    return ", ".join(f"{model}{' (base)' if model == merge_set.base else ''}: {read.name!r}"
                     for model, read in sorted(reads.items(), key=lambda item: str(item[0])))


def _settings(task) -> Dict[str, str]:
    """A planned task's parameter values, comparable between tasks: the method's
    (``lambda``) and each model's (``density`` of MODEL)."""
    values = {str(k): repr(v) for k, v in (getattr(task, "parameters", None) or {}).items()}
    for model, params in (getattr(task, "input_parameters", None) or {}).items():
        values.update({f"{k} of {model}": repr(v) for k, v in (params or {}).items()})
    return values


def _signature(reads) -> Optional[tuple]:
    """What a task reads, comparable between tasks (None where its reads are not known)."""
    if isinstance(reads, MetaGPTError):
        return None
    return tuple(sorted((str(model), read.key) for model, read in reads.items()))


def task_models(task, reads) -> Tuple[Hashable, ...]:
    """The task's models (in its order) whose tensors its input task gathers (``reads``:
    its ``plan_inputs.task_reads``): what the merge receives. mergekit 0.1.5 plans the
    post-weights of a ``slices:`` recipe (final norm, ``lm_head``) with the last slice's
    models but as many inputs as the first slice has sources, so where the last slice
    has more, the rest are named but never read."""
    return tuple(m for m in task.model_order if m in reads)


# -- which run a task belongs to ------------------------------------------------------
# Keyed by the task object's identity: two concurrent merges may hold equal tasks. The
# registry holds the task and the run weakly: the run lives as long as the task universe
# (the executor's) it is attached to, or its caller (the CLI) holds it, and goes with
# them. Entries whose task or run is gone are swept at the next ``register`` (no weakref
# callback: one run by the garbage collector while ``register`` holds the lock, in the
# same thread, would wait on that lock for ever).
_REGISTRY: Dict[int, Tuple[weakref.ref, weakref.ref]] = {}
_REGISTRY_LOCK = threading.Lock()
renew_after_fork(__name__, "_REGISTRY_LOCK")


def ours(tasks) -> List[object]:
    """The MetaGPT ExecuteMergeMethodTask objects among `tasks`."""
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    from mergekit_metagpt.method import VARIANTS

    return [
        t for t in tasks
        if isinstance(t, ExecuteMergeMethodTask) and getattr(t, "method_name", None) in VARIANTS
    ]


def register_universe(universe, context=None) -> Optional[MergeRun]:
    """For the task universe of one graph merge: record its MetaGPT tasks as one MergeRun
    and, outside a MetaGPT ``run_merge`` (whose wrapper does it itself), remove the earlier
    record from the folder the merge writes to, whatever its method: planned, nothing
    written yet (a merge that fails before, e.g. on a missing parameter, keeps it)."""
    tasks = getattr(universe, "tasks", None) or []
    mine = ours(tasks)
    run = None
    if mine:
        run = MergeRun(mine[0].method_name, mine, context,
                      writer_out_path(tasks) if context is None else None)
        run.check()  # a refused plan leaves the folder as it was
    if context is None:  # e.g. mergekit-pytorch: nothing has been written yet
        from mergekit_metagpt.record import remove_stale_record

        for out_path in merge_out_paths(tasks):
            remove_stale_record(out_path)
    if run is None:
        return None
    if context is not None:
        context.runs.append(run)
    # mergekit's FinalizeModel tasks whose class has the plugin's wrapper (re-imported: none)
    run.finalizers = [t for t in tasks if type(t).__name__ == "FinalizeModel"
                      and getattr(type(t).execute, "_mergekit_metagpt_wrapper", False)]
    run.shared_input_tasks = _adapter_inputs_in(tasks, mine)
    universe._mergekit_metagpt_run = run  # the universe keeps the run alive
    register(run)
    return run


def _adapter_inputs_in(tasks, mine) -> List[object]:
    """The tasks among `tasks` (the universe's, which mergekit's executor runs) that are
    other inputs of the vocabulary adapters of `mine` (the tokenizer build), where their
    class has the plugin's wrapper (which shares their value with the pre-pass)."""
    from mergekit_metagpt.plan_inputs import vocabulary_adapter

    inputs = []
    for task in mine:
        try:
            adapter = vocabulary_adapter(task)
        except MetaGPTError:  # the pre-pass says so
            continue
        for value in (adapter.inputs.values() if adapter is not None else ()):
            if value not in inputs:
                inputs.append(value)
    kinds = {type(value) for value in inputs
             if getattr(type(value).execute, "_mergekit_metagpt_wrapper", False)}
    return [t for t in tasks if type(t) in kinds and t in inputs]


def _writer_paths(tasks) -> List[str]:
    """The output folders of the tensor writer tasks among `tasks`, in order."""
    try:
        from mergekit.io.tasks import TensorWriterTask
    except ImportError:  # pragma: no cover - mergekit changed shape
        return []
    paths: List[str] = []
    for task in tasks:
        path = getattr(task, "out_path", None) if isinstance(task, TensorWriterTask) else None
        if path and path not in paths:
            paths.append(path)
    return paths


def writer_out_path(tasks) -> Optional[str]:
    """The folder the plan writes its tensors to (the first, if there are several)."""
    return next(iter(_writer_paths(tasks)), None)


def merge_out_paths(tasks) -> List[str]:
    """The folders a merge plan writes its tensors to: none unless the plan merges (has an
    ExecuteMergeMethodTask) and writes (a TensorWriterTask); e.g. not LoRA extraction."""
    try:
        from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
    except ImportError:  # pragma: no cover - mergekit changed shape
        return []
    if not any(isinstance(task, ExecuteMergeMethodTask) for task in tasks):
        return []
    return _writer_paths(tasks)


def register(run: MergeRun) -> None:
    """Make `run` findable from its tasks, for as long as something else holds it."""
    run_ref = weakref.ref(run)
    with _REGISTRY_LOCK:
        # entries of collected tasks, and of finished runs whose tasks mergekit still
        # holds (its planner's lru_cache keeps the last plans)
        for task_id in [i for i, (t, r) in _REGISTRY.items() if t() is None or r() is None]:
            del _REGISTRY[task_id]
        for merge_set in run.sets.values():
            for task in merge_set.tasks:
                _REGISTRY[id(task)] = (weakref.ref(task), run_ref)
        for task in [*getattr(run, "repeats", ()), *getattr(run, "finalizers", ()),
                     *getattr(run, "shared_input_tasks", ())]:
            _REGISTRY[id(task)] = (weakref.ref(task), run_ref)


def run_for_task(task) -> Optional[MergeRun]:
    if task is None:
        return None
    with _REGISTRY_LOCK:
        entry = _REGISTRY.get(id(task))
    if entry is None or entry[0]() is not task:
        return None
    return entry[1]()
