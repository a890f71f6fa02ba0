"""What one planned merge task reads from each model, taken from mergekit's own plan.

An ``ExecuteMergeMethodTask``'s input task maps each model to a leaf load task
(``LoadTensor`` for model folders, ``SimpleLoadTensor`` for ``mergekit-pytorch``'s raw
files). The leaves carry mergekit's resolution of the tensor (name, aliases, tied
names, dtype, device); executing one reads the tensor exactly as the merge does.
Vocabulary adapters (``PermutedVocabulary`` for ``tokenizer_source``,
``TruncatedVocabulary`` for ``--unsafe-truncate-embeddings``) wrap a ``GatherTensors``:
the reads are the gathered tensors', and the pre-pass runs the plan's own adapter on
them (``VocabularyAdapter``), so that the norms see the token-aligned tensors the
merge sees.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Dict, Hashable, Optional

import torch

from mergekit_metagpt.errors import MetaGPTError


@dataclass(frozen=True)
class TensorRead:
    """One model's input to one planned task."""

    model: Hashable  # the TensorEntry.id the method sees (a ModelReference)
    leaf: object  # mergekit's leaf load task

    @functools.cached_property
    def key(self) -> str:
        """What is read, independent of which checkpoint: the leaf's settings."""
        fields = self.leaf.model_dump(mode="json", exclude={"model", "device", "per_gpu"})
        return json.dumps([type(self.leaf).__name__, fields], sort_keys=True)

    @property
    def loader(self):
        """mergekit's LazyTensorLoader for this model (shared with the merge)."""
        model = self.leaf.model
        if isinstance(model, str):  # mergekit-pytorch's raw files
            from mergekit.scripts.merge_raw_pytorch import SimpleLoaderCache

            return SimpleLoaderCache().get(model)
        from mergekit.io.tasks import LoaderCache

        return LoaderCache().get(model)

    def checkpoint_name(self) -> Optional[str]:
        """The name mergekit reads from the checkpoint (aliases and tied names resolved as
        its ``LoadTensor`` resolves them), or None where the checkpoint holds none of them
        (an optional tensor, or one mergekit converts from others)."""
        resolve = getattr(self.leaf, "_resolve_name", None)
        if callable(resolve):
            return resolve(self.loader)
        name = getattr(self.leaf, "tensor_name", None) or getattr(self.leaf, "tensor", None)
        return name if name in self.loader.index.tensor_paths else None

    @property
    def name(self) -> str:
        """The tensor's name for messages and ordering: the checkpoint's where mergekit
        can say, else the name planned."""
        try:
            resolved = self.checkpoint_name()
        except Exception:  # no loader for the model here: the merge reports it
            resolved = None
        return resolved or getattr(self.leaf, "tensor", None) or getattr(self.leaf, "tensor_name", "?")

    def order(self) -> tuple:
        """Sort key: shard file, then name (each shard is visited once per model)."""
        name = self.name
        return (self.loader.index.tensor_paths.get(name, ""), name)

    def load(self) -> Optional[torch.Tensor]:
        """The tensor, as the merge reads it (None for an optional one the model lacks);
        a failed read names the model and tensor."""
        try:
            return self.leaf.execute()
        except MetaGPTError:
            raise
        except Exception as error:
            from mergekit_metagpt.errors import one_line, out_of_memory

            if out_of_memory(error):
                raise
            raise MetaGPTError(
                f"MetaGPT: cannot read tensor {self.name!r} of model {self.model}: {one_line(error)}"
            ) from error


def task_reads(task) -> Dict[Hashable, TensorRead]:
    """Each model's TensorRead for one ExecuteMergeMethodTask, via mergekit's own mapping."""
    source = task.gather_tensors
    inner = getattr(source, "gather_tensors", None)  # vocabulary adapters
    if inner is not None:
        source = inner
    leaves = source.arguments()
    if any(leaf.arguments() for leaf in leaves.values()):
        raise MetaGPTError(
            f"MetaGPT: cannot read the inputs of {task.output_weight.name!r}: "
            f"{type(source).__name__} has nested inputs the pre-pass does not know"
        )
    # The input task's own execute() turns its argument names into model ids; handed
    # the leaf tasks in place of tensors, it returns {model id: leaf task}.
    unknown = (f"MetaGPT: cannot read the inputs of {task.output_weight.name!r}: "
               f"{type(source).__name__} does not map its inputs to models as in the mergekit "
               f"versions the plugin knows")
    try:
        mapping = source.execute(**leaves)
    except Exception as error:  # it did more than rename (a mergekit that changed shape)
        from mergekit_metagpt.errors import one_line

        raise MetaGPTError(f"{unknown} ({one_line(error)})") from error
    if not isinstance(mapping, dict) or not all(hasattr(v, "execute") for v in mapping.values()):
        raise MetaGPTError(unknown)
    return {model: TensorRead(model, leaf) for model, leaf in mapping.items()}


@dataclass(frozen=True)
class VocabularyAdapter:
    """A task's vocabulary adapter (mergekit's ``PermutedVocabulary`` or
    ``TruncatedVocabulary``): it turns the gathered tensors (one per model, keyed by
    model) into the token-aligned tensors the merge method receives."""

    task: Any  # the adapter task of the plan
    tensors_argument: str  # the name under which it takes the gathered tensors
    inputs: Dict[str, Any]  # its other arguments, as tasks (e.g. the tokenizer build)

    @property
    def name(self) -> str:
        return type(self.task).__name__

    def settings(self, name_of) -> dict:
        """The adapter's own fields (the tokens' settings, padding, axis …), as JSON, each
        model named by `name_of` (its checkpoint's fingerprint: a moved folder still hits)."""
        excluded = {"gather_tensors", *self.inputs_fields()}
        return _plain({f: getattr(self.task, f) for f in type(self.task).model_fields if f not in excluded}, name_of)

    def inputs_fields(self) -> set:
        """The fields holding its other inputs' tasks (their values are keyed by digest)."""
        return {f for f in type(self.task).model_fields
                if any(getattr(self.task, f) is task for task in self.inputs.values())}

    def apply(self, tensors: Dict[Hashable, torch.Tensor], values: Dict[str, Any],
              held: Optional[list] = None) -> Dict[Hashable, torch.Tensor]:
        """The adapter's output for `tensors`, its other arguments' `values` given.
        `held`: in a merge, which runs this task too (for the first tensor before the
        pre-pass, for the others after it) and logs what it logs (mergekit's adapters log
        on the root logger: an UNSAFE truncation, a token no model has, once per tensor),
        what it logs here is held in that list, not logged: once, not twice (see
        `replay_root_records` where the merge stops before it runs them)."""
        if held is None:
            return self.task.execute(**{self.tensors_argument: tensors}, **values)
        with root_records_held(held):
            return self.task.execute(**{self.tensors_argument: tensors}, **values)


#: set while the pre-pass computes an adapter input itself (`executed_as_planned`): the
#: plugin's wrapper on the task's ``execute`` then runs it as it is, without sharing; it
#: holds the MetaGPT plan (``merge_plan.MergeRun``) where one is given, else True
_COMPUTING_ALONE: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "mergekit_metagpt_computing_alone", default=False)


def executed_as_planned(task, run=None) -> Any:
    """`task`'s value, computed here by its ``execute`` (any wrapper of another's
    included; the plugin's own shares nothing meanwhile: see `SharedInputs`), for the
    pre-pass of `run` (the plan, where known: see `alone_for`). For argument-less tasks."""
    token = _COMPUTING_ALONE.set(run if run is not None else True)
    try:
        return task.execute()
    finally:
        _COMPUTING_ALONE.reset(token)


def computing_alone() -> bool:
    """Whether this thread is in `executed_as_planned` (the pre-pass computing alone)."""
    return _COMPUTING_ALONE.get() is not False


def alone_for() -> Any:
    """The plan whose pre-pass computes alone in this thread (`executed_as_planned`), or
    None where it gave none."""
    value = _COMPUTING_ALONE.get()
    return None if isinstance(value, bool) else value


class SharedInputs:
    """The values of the vocabulary adapters' other inputs (mergekit's tokenizer build:
    loading every model's tokenizer, building the merged vocabulary and the token maps)
    in a merge, which both the pre-pass (for the token maps) and mergekit's executor
    (for the merge) need: computed once, by whichever asks first (the others wait), and
    let go once both have had it (a later ask computes it again). A computation that
    raised raises the same error for the later askers. Keyed by task equality: the
    executor's task and the one the pre-pass finds in the plan may be two equal objects."""

    TAKERS = frozenset({"pre-pass", "merge"})

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: Dict[Any, "_SharedEntry"] = {}

    def value(self, task, taker: str, compute) -> Any:
        while True:
            with self._lock:
                entry = self._entries.setdefault(task, _SharedEntry())
            with entry.lock:
                if entry.released:  # let go between our lookup and our turn: a fresh entry
                    continue
                if entry.error is not None:
                    raise entry.error
                if not entry.done:
                    try:
                        entry.value = compute()
                    except Exception as error:  # (an interrupt is not kept)
                        entry.error = error
                        raise
                    entry.done = True
                value = entry.value
                entry.taken.add(taker)
                if entry.taken >= self.TAKERS:  # both have it
                    entry.value, entry.released = None, True
                    with self._lock:
                        del self._entries[task]
                return value

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class _SharedEntry:
    def __init__(self):
        self.lock = threading.Lock()
        self.done = False
        self.released = False
        self.error: Optional[BaseException] = None
        self.value: Any = None
        self.taken: set = set()


class _HeldRecords(logging.Filter):
    """On the root logger: holds the records a thread logs there while it has a list to
    hold them in (`root_records_held`); passes every other record. Added at the first use
    and never removed: removing a filter while another thread logs may skip the next."""

    def __init__(self):
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        held = getattr(self.local, "held", None)
        if held is None:
            return True
        held.append(record)
        return False


_HELD = _HeldRecords()


@contextlib.contextmanager
def root_records_held(into: list):
    """What this thread logs on the root logger meanwhile goes to `into`, not to the
    handlers (other threads' records and other loggers' are not held)."""
    logging.getLogger().addFilter(_HELD)  # not added again where it is (or was put back)
    previous = getattr(_HELD.local, "held", None)
    _HELD.local.held = into
    try:
        yield
    finally:
        _HELD.local.held = previous


def replay_root_records(records: list) -> None:
    """Log held records after all (a merge that stops before it runs those tasks again)."""
    root = logging.getLogger()
    for record in records:
        root.handle(record)


def vocabulary_adapter(task) -> Optional[VocabularyAdapter]:
    """The task's vocabulary adapter, or None where the merge reads the gathered tensors."""
    source = task.gather_tensors
    inner = getattr(source, "gather_tensors", None)
    if inner is None:
        return None
    arguments = source.arguments()
    names = [name for name, argument in arguments.items() if argument is inner]
    others = {name: argument for name, argument in arguments.items() if argument is not inner}
    if len(names) != 1 or any(argument.arguments() for argument in others.values()):
        raise MetaGPTError(
            f"MetaGPT: cannot read the inputs of {task.output_weight.name!r}: "
            f"{type(source).__name__} takes inputs the pre-pass does not know"
        )
    return VocabularyAdapter(source, names[0], others)


@dataclass(frozen=True)
class InputDigest:
    """Digests of the value of an adapter's other input (mergekit's ``TokenizerInfo``)."""

    whole: str  # every model's token map, models named by fingerprint
    by_model: Dict[Hashable, str]  # each model's own: two checkpoints with the same weight
    # files (hardlinked copies, hub blobs two repos share) have one fingerprint, and may
    # differ only here


def input_digest(value, name_of) -> InputDigest:
    """For mergekit's ``TokenizerInfo``: which row of each model each token of the merged
    vocabulary takes, and each model's own vocabulary (what the aligned tensors depend on
    besides the tensors), by token, not by merged id (a union's ids for added tokens vary
    between processes; the norms do not). `name_of` names a model stably (its
    checkpoint's fingerprint)."""
    tokenizer = getattr(value, "tokenizer", None)
    permutations = getattr(value, "permutations", None)
    if tokenizer is None or not isinstance(permutations, dict):
        raise MetaGPTError(
            f"MetaGPT: cannot key the norms of the vocabulary tensors: a vocabulary "
            f"adapter takes a {type(value).__name__}, which the pre-pass does not know"
        )
    vocab = tokenizer.get_vocab()
    # each model's own vocabulary too: a token setting may take a row by a model's token
    originals = getattr(value, "original_vocabs", None) or {}
    by_model = {}
    for model, permutation in permutations.items():
        rows = sorted((token, int(permutation.get(token_id, -1))) for token, token_id in vocab.items())
        own = sorted((originals.get(model) or {}).items())
        by_model[model] = hashlib.sha256(json.dumps([rows, own]).encode()).hexdigest()
    whole = sorted((name_of(model), digest) for model, digest in by_model.items())
    return InputDigest(hashlib.sha256(json.dumps([len(vocab), whole]).encode()).hexdigest(), by_model)


def _plain(value, name_of):
    """`value` as plain JSON data (pydantic models, mergekit's ImmutableMap, tuples), each
    ModelReference named by `name_of`."""
    from mergekit.common import ModelReference

    if isinstance(value, ModelReference):
        return name_of(value)
    if hasattr(type(value), "model_fields"):  # a pydantic model (asked of its class: pydantic 2.11)
        return {f: _plain(getattr(value, f), name_of) for f in type(value).model_fields}
    if hasattr(value, "items"):
        return {str(k): _plain(v, name_of) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, name_of) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
