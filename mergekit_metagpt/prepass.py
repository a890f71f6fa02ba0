"""The streaming pre-pass: squared task-vector norms over exactly what a merge reads.

For a graph merge (``mergekit-yaml``, ``run_merge``, ``mergekit-multi``,
``mergekit-pytorch``), the first MetaGPT task that executes computes the norms of
the whole ``MergeRun``: for every planned output tensor of every merge set, and each
model of that set, ‖θ_t − θ₀‖² of the two tensors the task reads, read through the
plan's own leaf load tasks (so slices, aliases, tied names, dtypes and the device
are mergekit's). One task's tensors (the base's and each model's, as the merge of that
tensor holds them) are in memory at a time; float32 work is done in reused chunks (a
whole float32 tensor only for ``lambda_from: sparse``), each base chunk converted once
for all models and checked for NaN/Inf in the same pass, which also takes the inner
products ⟨δ_a, δ_b⟩ of each pair of dense task vectors (the cosine similarities of
``similarity``). On CUDA, tensors loaded on the CPU go over through pinned buffers
(``staging``). Reads go in the base's shard order; on CPU, a model's safetensors shard
is closed once RELEASE_BYTES (16 MiB) of its tensors were read since the pre-pass last
closed it, and every shard at the end, so that mapped pages do not pile up in RSS while
a shard of many small tensors is not reopened per tensor (``.bin`` shards stay loaded:
unpickling them costs; under an address-space limit, every shard stays open to the end).

Where the plan aligns vocabularies (``tokenizer_source``: mergekit's
``PermutedVocabulary``; ``--unsafe-truncate-embeddings``: ``TruncatedVocabulary``),
the pre-pass loads all of the task's inputs, checks them for NaN/Inf, and runs the
plan's own adapter on them, so the norms are those of the token-aligned tensors the
merge reads (rows a model lacks take mergekit's defaults for it). Any other shape
difference is an error (mergekit refuses to merge such tensors), raised before any
weights are written. Dense norms are memoized in process and cached on disk per
(base, model) checkpoint pair and per read, inner products per (base, model, model);
``lambda_from: sparse`` norms are computed afresh in each merge (DARE's masks are
random).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Tuple

import torch

from mergekit_metagpt.env import switched_off
from mergekit_metagpt.buffers import refuse_not_floating, refuse_other_buffer
from mergekit_metagpt.errors import MetaGPTError, base_lacks, out_of_memory
from mergekit_metagpt import norm_memo
from mergekit_metagpt.merge_plan import task_models
from mergekit_metagpt.norm_memo import clear_memo  # noqa: F401  (tests and benchmarks call it here)
from mergekit_metagpt.norms import (BASE, NormAccumulator, Sparsifier, non_finite, norms_device, squared_delta,
                                    task_vector_sums)
from mergekit_metagpt.plan_inputs import (
    InputDigest, SharedInputs, TensorRead, VocabularyAdapter, executed_as_planned, input_digest,
    replay_root_records, vocabulary_adapter,
)
from mergekit_metagpt.scratch import thread_scratch
from mergekit_metagpt.set_norms import MISSING, RunNorms, SetNorms

LOG = logging.getLogger("mergekit_metagpt")


class PrepassStats:
    """Counters for tests and benchmarks."""

    def __init__(self):
        self.runs = 0  # pre-passes that read tensors
        self.cache_hits = 0  # (base, model) pairs whose norms came from memo or cache, and not read
        self.tensors_read = 0
        self.bytes_read = 0
        self.seconds = 0.0
        self.last_device = ""  # device of the last pre-pass that read tensors


STATS = PrepassStats()

def _sparsifier(task, method, models) -> Optional[Sparsifier]:
    """The method's sparsifier for this task's parameters (None: dense norms)."""
    if method is None:
        return None
    params = dict(task.parameters.items())
    params["density"] = {model: dict(task.input_parameters[model].items()).get("density", 1.0) for model in models}
    return method.sparsifier(params)


def _check_shape(read: TensorRead, base_read: TensorRead, axis, tensor, base_tensor) -> None:
    """Raise where a model's tensor (as the merge receives it) differs in shape from the
    base's: mergekit refuses to merge it, so the pre-pass says so first, before any
    weights are written."""
    if tensor.shape == base_tensor.shape:
        return
    vocabulary = axis is not None and tensor.dim() == base_tensor.dim() and all(
        a == b for i, (a, b) in enumerate(zip(tensor.shape, base_tensor.shape)) if i != axis
    )
    raise MetaGPTError(
        f"MetaGPT: shape mismatch for tensor {read.name!r}: model {read.model} has "
        f"{tuple(tensor.shape)}, base model {base_read.model} has {tuple(base_tensor.shape)}"
        + (" (vocabularies of different sizes: set tokenizer_source, e.g. `tokenizer_source: base`, "
           "so that mergekit aligns them by token, or pass --unsafe-truncate-embeddings)" if vocabulary else "")
    )


@dataclass
class _Planned:
    """One planned task as the pre-pass sees it: its reads, and for each model besides
    the base the key of what is read."""

    task: object
    reads: Dict[Hashable, TensorRead]
    sparsifier: Optional[Sparsifier]
    keys: Dict[Hashable, str]
    adapter: Optional[VocabularyAdapter] = None  # the plan's vocabulary alignment, if any
    adapter_values: Dict[str, object] = field(default_factory=dict)  # its other inputs' values
    pair_keys: Dict[Tuple[Hashable, Hashable], str] = field(default_factory=dict)  # dense tasks only

    @property
    def base_read(self) -> TensorRead:  # a MergeRun holds no task that reads no base
        return self.reads[self.task.base_model]


class _AdapterInputs:
    """The values of the vocabulary adapters' other inputs (mergekit's tokenizer build),
    each computed once per pre-pass, and their digests for the cache keys. In a merge,
    shared with mergekit's executor (`SharedInputs`): the tokenizers load once."""

    def __init__(self, checkpoint_of, run=None, plan=None):
        self.checkpoint_of = checkpoint_of
        self.plan = plan  # the MetaGPT plan (merge_plan.MergeRun), merge or not
        # in a merge, the tasks mergekit's executor runs under the plugin's wrapper (whose
        # share it takes: another, computed here alone, goes when the pre-pass ends)
        self.shared: Optional[SharedInputs] = run.shared_inputs if run is not None else None
        self.shared_tasks = list(run.shared_input_tasks) if run is not None else []
        self._done: List[Tuple[object, object, InputDigest]] = []  # (task, value, digests)

    def get(self, task) -> Tuple[object, InputDigest]:
        for known, value, digest in self._done:
            if known == task:
                return value, digest
        if self.shared is None or not any(task == shared for shared in self.shared_tasks):
            value = executed_as_planned(task, self.plan)
        else:
            value = self.shared.value(task, "pre-pass", lambda: executed_as_planned(task, self.plan))
        digest = input_digest(value, lambda model: self.checkpoint_of(model) or str(model))
        self._done.append((task, value, digest))
        return value, digest


def _plan(task, reads, method, checkpoint_of, adapter_inputs: _AdapterInputs) -> _Planned:
    axis = task.output_weight.vocabulary_axis
    adapter = vocabulary_adapter(task)
    base = reads[task.base_model]  # a MergeRun holds no task that reads no base
    keys: Dict[Hashable, str] = {}
    group, values, own = "", {}, {}
    if adapter is not None:  # what is read depends on the adapter, its inputs and every model of the task
        digests = {}
        for name, input_task in adapter.inputs.items():
            values[name], digests[name] = adapter_inputs.get(input_task)
        name_of = lambda model: checkpoint_of(model) or str(model)  # noqa: E731
        identity = [adapter.name, adapter.settings(name_of), {n: d.whole for n, d in digests.items()},
                    sorted(name_of(m) for m in reads)]
        group = f"|{adapter.name} " + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        # each model's own token map, and the base's: the whole digest names models by
        # fingerprint, which two checkpoints with the same weight files share
        for model in reads:
            own[model] = "".join(f"|{digests[n].by_model.get(model, '-')[:16]}" for n in sorted(digests))
    models = [m for m in task_models(task, reads) if m != task.base_model]
    for model in models:
        read = reads[model]
        keys[model] = f"{base.key}|{read.key}|{axis}{group}{own.get(task.base_model, '')}{own.get(model, '')}"
    sparsifier = _sparsifier(task, method, models)
    pair_keys = {}
    if sparsifier is None:  # inner products of the dense task vectors, for each pair of models
        # each pair in one order whatever the recipe's (the cache's entry is per ordered triple)
        counted = sorted(keys, key=lambda m: (checkpoint_of(m), keys[m], str(m)))
        for i, a in enumerate(counted):
            for b in counted[i + 1:]:
                pair_keys[(a, b)] = f"{keys[a]}#{keys[b]}"
    return _Planned(task, reads, sparsifier, keys, adapter, values, pair_keys)


def merge_products() -> str:
    """What a merge computes of the inner products: "when read" (see `compute`), or "never" with
    ``MERGEKIT_METAGPT_COSINES=0`` (T(T−1)/2 products cost the pre-pass more as T grows)."""
    return "never" if switched_off("MERGEKIT_METAGPT_COSINES") else "when read"


def run_norms(run, device: torch.device, method=None, products: Optional[str] = None, task=None,
              tensors: Optional[Dict[Hashable, torch.Tensor]] = None) -> RunNorms:
    """The run's norms, computed by the first caller (others wait), then reused. A
    pre-pass that failed is not retried: every later caller (e.g. the other threads of
    ``--multi-gpu``) gets the same error at once. `products`: see `compute`; `task`: the
    merge task that asks, whose inputs mergekit has run; `tensors`: those inputs, as
    mergekit gave them to the method (see `compute`'s `given`)."""
    if task is not None:
        run.inputs_run.add(id(task))
    with run.lock:
        if run.error is not None:
            raise run.error
        if run.result is None:
            from mergekit_metagpt.progress import logs_above_bars

            with logs_above_bars():  # mergekit's "Executing graph" bar is on screen
                try:
                    given = {id(task): tensors} if task is not None and tensors else None
                    run.result = compute(run, norms_device(torch.device(device)), method,
                                         products or merge_products(), given=given)
                    _announce(run)
                except BaseException as error:
                    # no λ without their log and record: the other callers get the error;
                    # the merge stops, and will not run the adapters whose records were held
                    run.result, run.error = None, error
                    try:
                        replay_root_records([r for t, r in run.held_records if t not in run.inputs_run])
                    except Exception:  # a handler or filter of the user's: the pre-pass's error first
                        LOG.debug("MetaGPT: could not log mergekit's held messages", exc_info=True)
                    raise
                finally:
                    run.held_records.clear()
        return run.result


def _log_similarity(stats, which: str) -> None:
    if len(stats.models) < 2:
        return
    if stats.computed:
        LOG.info("MetaGPT task-vector cosine similarities%s:\n%s\n%s", which, stats.cosine_table(), stats.verdict())
    else:  # no pair computed: no table of blanks
        LOG.info("MetaGPT task-vector cosine similarities%s: %s", which, stats.verdict())
    if stats.far_pairs():
        LOG.warning("MetaGPT%s: %s", which, stats.verdict())
    if stats.missing_pairs and merge_products() != "never":
        # info, not a warning: it holds for every merge of a new combination of cached
        # models, and again for each until `inspect` computes the products
        LOG.info("MetaGPT%s: %s", which, stats.missing_text())


def _holds(read) -> bool:
    """Whether the read's checkpoint holds a tensor under one of its names."""
    from mergekit_metagpt.checkpoint_files import shard_path

    try:
        return shard_path(read) is not None
    except Exception:  # no loader here: the merge reports it
        return False


def _warn_of_a_lone_model(run, set_norms, which) -> None:
    """A model set of one model besides the base (a recipe's, or one slice's): its λ is 1."""
    from mergekit_metagpt.method import VARIANTS

    if len(set_norms.coefficients.squared_norms) != 1:
        return
    (model, norm), = set_norms.coefficients.squared_norms
    if norm > 0:  # else it equals the base: said as such
        what = "this merge is" if not which else "its tensors are merged as"
        LOG.warning("MetaGPT%s: only one model besides the base (%s): its λ is 1, so %s stock %s with weight 1; "
                    "MetaGPT weighs two or more models (list the others beside it)",
                    which, model, what, VARIANTS.get(run.method_name) or "task_arithmetic")


def _announce(run) -> None:
    from mergekit_metagpt.coefficients import scale_note, scale_values
    from mergekit_metagpt.record import (
        passed_through_entries, passed_through_text, remove_stale_record, set_parameters, write_record,
    )

    count = len(run.result.merging)
    for number, set_norms in enumerate(run.result.merging, 1):
        which = f", model set {number} of {count}" if count > 1 else ""
        set_norms.coefficients.log(f"{run.method_name}, base {set_norms.merge_set.base}{which}")
        scale = set_parameters(set_norms)["lambda"]
        scaled = scale_note(scale, ascii=True)
        if scaled:
            LOG.info("MetaGPT%s: %s", which, scaled)
        if all(v == 0.0 for v in scale_values(scale)):
            LOG.warning("MetaGPT%s: lambda: 0 (the recipe's scale) adds no task vector: the merge writes "
                        "the base model's weights", which)
        _log_similarity(set_norms.stats, which)
        _warn_of_a_lone_model(run, set_norms, which)
    passed = passed_through_text(passed_through_entries(run.result))
    if passed:
        LOG.info("MetaGPT: %s", passed)
    try:
        _say_lambdas(run)
    except Exception as error:  # a line of output is no reason to fail the merge, nor to hide a bug
        LOG.warning("MetaGPT: the λ line was not written (%s: %s); the record and -v's table have them",
                    type(error).__name__, error, exc_info=LOG.isEnabledFor(logging.DEBUG))
    if run.record_at_end:  # written once mergekit has written the model (integration); the
        # earlier run's goes now, before the weights it was of are replaced
        remove_stale_record(run.out_path)
    else:
        write_record(run)


def _as_written(path) -> str:
    """The output folder as mergekit writes it: a quoted "~/out" is a folder named "~" here."""
    path = str(path)
    return os.path.join(".", path) if path.startswith("~") else path


def _say_lambdas(run) -> None:
    """A merge's λ in one line per model set where its log does not show the table
    (mergekit's default verbosity), with the progress lines: what MetaGPT chose, without -v."""
    from mergekit_metagpt.coefficients import scale_given
    from mergekit_metagpt.progress import say
    from mergekit_metagpt.record import RECORD_NAME, set_parameters
    from mergekit_metagpt.similarity import short_names

    if not run.out_path or LOG.isEnabledFor(logging.INFO):  # the CLI's own tables; -v: the table
        return
    count = len(run.result.merging)
    for number, set_norms in enumerate(run.result.merging, 1):
        lambdas = set_norms.coefficients.lambdas
        names = short_names(list(lambdas))
        which = f" (model set {number} of {count})" if count > 1 else ""
        if set_parameters(set_norms)["granularity"] != "global":  # its tensors take their own
            which += " (global shares; granularity per_tensor merges each tensor with its own)"
        scaled = scale_given(set_parameters(set_norms)["lambda"])
        say(f"MetaGPT λ{which}: " + ", ".join(f"{name} {lam:.3g}" for name, lam in zip(names, lambdas.values()))
            + (f"; each times lambda {scaled}" if scaled else "") + f" (-v logs the table; the record: {os.path.join(_as_written(run.out_path), RECORD_NAME)})",
            quiet=bool(getattr(run.options, "quiet", False)))


def _files_now(loader, started: Optional[tuple]) -> str:
    """The fingerprint of a loader's files as its next reads find them. Its open shard (the
    one mergekit or an earlier merge read last) is of these files where they are as they
    were when ``run_merge`` began (`started`, taken with no shard open): else it is closed
    first, as a file replaced by rename since it was opened would still be read through it
    (kept where the key is not known and the address space is limited: a shard closed
    while mergekit holds tensors of it would be mapped twice, see `_Releaser`)."""
    from mergekit_metagpt.fingerprint import checkpoint_key

    key = checkpoint_key(loader.index)
    if (started is not None and started[1] == key) or (started is None and address_space_limited()):
        return key
    flush = getattr(loader, "flush", None)
    if not callable(flush):
        return key
    flush()
    return checkpoint_key(loader.index)


def compute(run, device: torch.device, method=None, products: str = "when read",
            given: Optional[Dict[int, Dict[Hashable, torch.Tensor]]] = None) -> RunNorms:
    """Norms of every merge set of `run` (see the module docstring), and the inner
    products of each pair of dense task vectors: with ``products="when read"`` (merges),
    of the pairs of which the pre-pass reads at least one tensor anyway for its norm (the
    other model's tensor is then read too), the others from the cache where an earlier run
    put them (never a read where no norm needs one); with ``"always"`` (``inspect``), all
    of them; with ``"never"``, none but the cached. `given`: id of a task -> its inputs as
    mergekit's executor gave them to the method (the merge task that runs the pre-pass):
    for a task with a vocabulary adapter, its token-aligned tensors are taken from there,
    not aligned again (mergekit aligns row by row: seconds per tensor for a large
    vocabulary)."""
    from mergekit_metagpt import norm_cache
    from mergekit_metagpt.fingerprint import changed_since

    caching = norm_cache.enabled()
    ckpt_keys: Dict[Hashable, str] = {}

    def checkpoint_of(model) -> str:
        """The checkpoint's fingerprint ("" without the cache: nothing is keyed on it)."""
        return ckpt_keys.get(model, "")

    planned: List[_Planned] = []
    adapter_inputs = _AdapterInputs(checkpoint_of, run if run.merge_executes_plan else None, plan=run)
    # model -> (its index, the fingerprint of its files as the pre-pass reads them); and as
    # they were when run_merge began (before mergekit opened them), which the check at the
    # merge's end compares with (`MergeRun.changed_inputs`)
    read_keys: Dict[Hashable, tuple] = {}
    started = getattr(run.context, "input_keys", None) or {} if run.context is not None else {}
    for merge_set in run.sets.values():
        for task in merge_set.tasks:
            reads = run.reads_of(task)
            for model, read in reads.items():
                if model not in run.input_keys:
                    read_keys[model] = (read.loader.index, _files_now(read.loader, started.get(model)))
                    run.input_keys[model] = started.get(model) or read_keys[model]
                    if caching:
                        ckpt_keys[model] = read_keys[model][1]
            planned.append(_plan(task, reads, method, checkpoint_of, adapter_inputs))

    aligned = sorted({(item.adapter.name, item.base_read.name) for item in planned if item.adapter})
    if aligned:
        LOG.info(
            "MetaGPT: norms of %s over mergekit's token-aligned tensors (%s), as the merge reads them",
            ", ".join(name for _, name in aligned), ", ".join(sorted({kind for kind, _ in aligned})),
        )

    # What each (task, model) needs, and what the memo or the cache already holds.
    known: Dict[Tuple[Hashable, Hashable], dict] = {}
    known_products: Dict[Tuple[Hashable, Hashable, Hashable], dict] = {}
    todo: List[Tuple[_Planned, List[Hashable], List[Tuple[Hashable, Hashable]]]] = []
    wanted, pending = set(), set()  # (base, model) pairs read by some task / still to read
    reread = set()  # (base, model) pairs whose norms are known, read for inner products
    # pairs and triples whose cache entry was read for a key the memo lacked, and lacked it
    # too: not read again this merge (the entry is read again where the memo lacks a key,
    # as another process may have stored it since this one first loaded the entry)
    refreshed = set()
    for item in planned:
        task, need = item.task, set()
        for model, key in item.keys.items():
            pair = (task.base_model, model)
            if pair not in known or (key not in known[pair] and pair not in refreshed):
                known[pair] = norm_memo.known(checkpoint_of(pair[0]), checkpoint_of(model), want=key)
                if key not in known[pair]:  # the cache was read for it: not again this merge
                    refreshed.add(pair)
            wanted.add(pair)
            if key in known[pair] and known[pair][key] is None and _holds(item.reads[model]):
                # "lacks it" (what the pre-pass records of an optional tensor a model lacks)
                # for a tensor its checkpoint holds: not a value a pre-pass of these files wrote
                LOG.warning("MetaGPT: the norm cache says model %s lacks tensor %r, which its checkpoint "
                            "holds: read again", model, item.reads[model].name)
                del known[pair][key]
            if item.sparsifier is not None or key not in known[pair]:
                need.add(model)
                pending.add(pair)
        pairs = []
        for (a, b), pair_key in item.pair_keys.items():
            triple = (task.base_model, a, b)
            # a merge ("when read") takes the products of a model it reads anyway with each
            # other model, reading that one's tensor too where its norm is known (a cached
            # model merged with a new one); "always" also reads models whose norms are all
            # known, for their products
            wanted_product = products == "always" or (products == "when read" and (a in need or b in need))
            if triple not in known_products or (
                    wanted_product and pair_key not in known_products[triple] and triple not in refreshed):
                known_products[triple] = norm_memo.known_products(
                    *(checkpoint_of(m) for m in triple), want=pair_key if wanted_product else None)
                if wanted_product and pair_key not in known_products[triple]:
                    refreshed.add(triple)
            if wanted_product and pair_key not in known_products[triple]:
                pairs.append((a, b))
        read = need | {m for pair in pairs for m in pair}
        reread.update((task.base_model, m) for m in read - need)
        if read:
            todo.append((item, [m for m in item.keys if m in read], pairs))

    for pair in (pair for pair in known if pair in wanted and pair not in pending):  # in plan order
        if pair in reread:
            LOG.info("MetaGPT: norms of %s from the norm cache; its tensors read again for its inner "
                     "products with the models read for their norms", pair[1])
            continue
        STATS.cache_hits += 1
        LOG.info("MetaGPT: norms of %s from the norm cache", pair[1])

    found = _Found()
    if todo:
        _stream(run, device, todo, found, given or {})
        moved = set(changed_since(read_keys))  # since the pre-pass took their keys
        if moved:  # what was read may mix their old files and the new: kept for this run only
            LOG.warning("MetaGPT: the files of %s changed while the pre-pass read them: their norms are not "
                        "written to the norm cache", ", ".join(map(str, moved)))
        if run.merge_executes_plan:  # files changed since run_merge began (said at the merge's end):
            # mergekit read the first task's inputs, which the pre-pass takes as they are
            # (`given`: the token-aligned tensors), from the files as they were then
            moved |= {model for model, (_, key) in read_keys.items()
                      if model in started and started[model][1] != key}
        # the inner products written first, and the norms only where all of them were: a
        # later merge that finds a model's norms cached does not read it again, so it could
        # not compute a product whose entry is missing (a full disk between the two writes).
        # Norms not written are not kept in the memo either (a later write of the same
        # entry, for other reads, would write them from there).
        products_written = True
        for triple, values in found.products.items():
            known_products[triple].update(values)
            if moved.intersection(triple):
                continue
            products_written &= norm_memo.remember_products(
                [checkpoint_of(m) for m in triple], known_products[triple], labels=triple)
        if caching and not products_written:
            LOG.debug("MetaGPT: norms not written to the norm cache, as some inner products could "
                      "not be: a later merge reads these models again and computes both")
        for pair, values in found.dense.items():
            norms = known[pair]
            norms.update(values)
            if products_written and not moved.intersection(pair):
                norm_memo.remember(checkpoint_of(pair[0]), checkpoint_of(pair[1]), norms, labels=pair)

    sets = []
    index = {id(item.task): item for item in planned}
    for merge_set in run.sets.values():
        per_task = {m: [] for m in merge_set.models}
        models = list(merge_set.models)
        per_pair = {(a, b): [] for i, a in enumerate(models) for b in models[i + 1:]}
        sparse = False
        for task in merge_set.tasks:
            item = index[id(task)]
            sparse |= item.sparsifier is not None
            for (a, b), values in per_pair.items():
                pair_key = item.pair_keys.get((a, b)) or item.pair_keys.get((b, a))
                triple = (task.base_model, a, b) if (a, b) in item.pair_keys else (task.base_model, b, a)
                values.append(
                    None if pair_key is None
                    else known_products.get(triple, {}).get(pair_key, MISSING)
                )
            for model in merge_set.models:
                if item.sparsifier is not None:
                    per_task[model].append(found.sparse.get((id(task), model)))
                else:
                    per_task[model].append(known[(task.base_model, model)].get(item.keys[model]))
        sets.append(SetNorms(merge_set, per_task, sparse=sparse, per_pair=per_pair))
    return RunNorms(sets)


@dataclass
class _Found:
    """What a pre-pass computed: dense norms per (base, model) pair and read
    key; sparse ones per (task, model)."""

    dense: Dict[Tuple[Hashable, Hashable], Dict[str, Optional[float]]] = field(default_factory=dict)
    sparse: Dict[Tuple[int, Hashable], float] = field(default_factory=dict)
    products: Dict[Tuple[Hashable, Hashable, Hashable], Dict[str, Optional[float]]] = field(default_factory=dict)


#: Bytes a model's safetensors shard may have mapped before the pre-pass closes it.
RELEASE_BYTES = 16 * 1024 * 1024


def address_space_limited() -> bool:
    """Whether this process has a finite RLIMIT_AS (``ulimit -v``, a cluster's ``h_vmem``)."""
    try:
        import resource

        return resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY
    except Exception:  # no `resource` (Windows), or no such limit here
        return False


class _Releaser:
    """Closes the safetensors shards the pre-pass mapped (mergekit's own flush, under the
    loader's lock) once RELEASE_BYTES of a loader's tensors were read since the pre-pass
    last closed it (or first used it), and all of them at the end, a failed read's too, so
    that mapped pages do not pile up in RSS (with ``--cuda`` too: safetensors maps the files
    whatever the device tensors are read to), while a shard of many small tensors is
    not reopened (its header parsed) per tensor. Under an address-space limit, only at
    the end (see ``__init__``)."""

    def __init__(self):
        self.mapped = {}  # id(loader) -> [loader, bytes read since it was closed]
        # Under an address-space limit, a shard closed mid-pass may still be mapped for
        # mergekit (the first merge task's inputs), and opening it again maps it twice:
        # there, shards stay open until the end, as the merge keeps them (RSS, which a
        # limit on the address space bounds too, is then the merge's)
        self.hold = address_space_limited()
        if self.hold:
            LOG.info("MetaGPT: an address-space limit (ulimit -v) is set: the pre-pass keeps each shard "
                     "mapped until it ends, as the merge does, rather than map it again")

    def track(self, item: "_Planned") -> None:
        """The loaders a task is about to read (closed at the end even if a read fails)."""
        for read in item.reads.values():
            if read.loader.index.is_safetensors:
                self.mapped.setdefault(id(read.loader), [read.loader, 0])

    def count(self, read, nbytes: int) -> None:
        if read.loader.index.is_safetensors:
            self.mapped.setdefault(id(read.loader), [read.loader, 0])[1] += nbytes

    def after_task(self) -> None:
        if self.hold:
            return
        for key in [k for k, (_, n) in self.mapped.items() if n >= RELEASE_BYTES]:
            self.mapped.pop(key)[0].flush()

    def close(self) -> None:
        for loader, _ in self.mapped.values():
            loader.flush()
        self.mapped.clear()


#: On CUDA, CPU-loaded tensors go over through pinned buffers (see ``staging``);
#: False: plain ``tensor.to(device)`` (kept for comparison in benchmarks/prepass.py).
PINNED_STAGING = True


def _mover(device):
    """How a loaded tensor reaches the pre-pass's device, and how to end that."""
    if device.type == "cuda" and PINNED_STAGING:
        from mergekit_metagpt.staging import PinnedStaging

        staging = PinnedStaging(device)

        def move(tensor):
            return staging.to_device(tensor) if tensor.device.type == "cpu" else tensor.to(device)

        return move, staging.close
    return (lambda tensor: tensor.to(device)), (lambda: None)


def _stream(run, device, todo, found: _Found, given: Dict[int, Dict[Hashable, torch.Tensor]]) -> None:
    from mergekit_metagpt.progress import progress_bar

    scratch = thread_scratch()
    move, end_moves = _mover(device)
    # on every device: safetensors maps the files whatever the device tensors are read to
    releaser = _Releaser()
    accumulator = NormAccumulator([BASE], {})
    todo = sorted(todo, key=lambda entry: entry[0].base_read.order())
    quiet = bool(getattr(run.options, "quiet", False))
    started = time.perf_counter()
    STATS.runs += 1
    STATS.last_device = str(device)
    models = {m for _, ms, _ in todo for m in ms}
    LOG.info(
        "MetaGPT pre-pass: reading %d planned tensors of the base and %d model(s) on %s",
        len(todo), len(models), device,
    )
    with progress_bar(total=len(todo), desc="MetaGPT norm pre-pass", quiet=quiet) as bar:
        try:
            _stream_tasks(todo, move, scratch, accumulator, found, releaser, bar,
                          held=run.held_records if run.merge_executes_plan else None, given=given)
        finally:
            end_moves()
            releaser.close()
    values = accumulator.finish()
    values.pop(BASE, None)
    for by_slot in values.values():
        for slot, value in by_slot.items():
            if isinstance(slot[0], int):  # sparse: (task id, model)
                found.sparse[slot] = value
            elif len(slot[0]) == 3:  # inner product: ((base, a, b), pair key)
                triple, key = slot
                found.products.setdefault(triple, {})[key] = value
            else:
                pair, key = slot
                found.dense.setdefault(pair, {})[key] = value
    STATS.seconds += time.perf_counter() - started


def _stream_tasks(todo, move, scratch, accumulator, found: _Found, releaser, bar,
                  held: Optional[list] = None, given: Optional[Dict[int, Dict[Hashable, torch.Tensor]]] = None) -> None:
    """`held`: in a merge, where the records mergekit's vocabulary adapters log are held,
    as (id of the task, record) (see `plan_inputs.root_records_held`); None: logged.
    `given`: see `compute`."""
    done = set()  # (pair or triple, key) computed: a layer merged twice counts twice, is read once
    for item, to_read, pairs in todo:
        task, sparsifier = item.task, item.sparsifier
        pairs = [p for p in pairs if ((task.base_model, *p), item.pair_keys[p]) not in done]
        in_pairs = {m for p in pairs for m in p}
        to_read = [
            m for m in to_read
            if sparsifier is not None or m in in_pairs
            or ((task.base_model, m), item.keys[m]) not in done
        ]
        if not to_read:
            bar.update(1)
            continue
        base_read = item.base_read
        releaser.track(item)
        if item.adapter is not None:
            aligned = _load_aligned(item, bar, releaser, held, (given or {}).get(id(task)))

            def fetch(model, aligned=aligned):  # each tensor moved when taken, once
                tensor = aligned.pop(model, None)
                return None if tensor is None else move(tensor)

            base_tensor = fetch(task.base_model)
            del aligned
        else:
            def fetch(model, item=item):
                return _load(item.reads[model], move, bar, 0, releaser)

            base_tensor = _load(base_read, move, bar, 1, releaser)
        if base_tensor is None:
            holders = [m for m in to_read if _holds(item.reads[m])] or to_read
            raise base_lacks(task.base_model, base_read.name, holders)
        if not base_tensor.is_floating_point():  # e.g. an integer buffer: not a weight, adds 0
            # (None is kept for a tensor the model lacks, which the cache's check tells apart);
            # mergekit copies one all inputs agree on, and stops at the first that differs
            # ("Non-floating buffer … differs", naming no model), once λ are out: named here
            for model in to_read:
                refuse_other_buffer(item.reads[model].name, model, fetch(model), base_tensor, task.base_model)
            for model in to_read:
                found.dense.setdefault((task.base_model, model), {})[item.keys[model]] = 0.0
                done.add(((task.base_model, model), item.keys[model]))
            for a, b in pairs:
                found.products.setdefault((task.base_model, a, b), {})[item.pair_keys[(a, b)]] = None
                done.add(((task.base_model, a, b), item.pair_keys[(a, b)]))
        else:
            accumulator.labels.setdefault(BASE, f"the base model {task.base_model}")
            _task_norms(item, to_read, pairs, base_tensor, fetch, scratch, accumulator, found, done)
        del base_tensor, fetch
        releaser.after_task()


def _load(read: TensorRead, move, bar, step: int, releaser) -> Optional[torch.Tensor]:
    tensor = read.load()
    if tensor is None:
        return None
    releaser.count(read, tensor.nbytes)
    tensor = move(tensor)
    STATS.tensors_read += 1
    STATS.bytes_read += tensor.nbytes
    bar.update(step, nbytes=tensor.nbytes)
    return tensor


def _load_aligned(item: _Planned, bar, releaser, held: Optional[list] = None,
                  given: Optional[Dict[Hashable, torch.Tensor]] = None) -> Dict[Hashable, torch.Tensor]:
    """Every input of a task with a vocabulary adapter (the adapter needs them all: a row
    a model lacks may take another model's), checked for NaN/Inf (so that a bad row is
    blamed on its own model before the adapter copies it; also rows the alignment drops),
    then aligned by the plan's adapter where they were loaded, as the merge aligns them
    (the caller moves to the device only the tensors it takes). `given`: the aligned
    tensors mergekit's executor made of the same inputs for the merge task that runs the
    pre-pass (see `compute`), taken as they are (read only: the merge uses them next)
    instead of aligning again (mergekit aligns row by row: seconds per tensor for a large
    vocabulary), where they are those of the same models."""
    task = item.task
    loaded = {}
    for model, read in item.reads.items():  # in the plan's order, as GatherTensors gives them
        tensor = read.load()
        if tensor is None:  # an optional tensor this model lacks
            continue
        releaser.count(read, tensor.nbytes)
        STATS.tensors_read += 1
        STATS.bytes_read += tensor.nbytes
        bar.update(0, nbytes=tensor.nbytes)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            who = f"the base model {model}" if model == task.base_model else f"model {model}"
            what = non_finite("NaN or Inf", tensor.dtype == torch.float16)
            raise MetaGPTError(f"MetaGPT: non-finite values ({what}) in tensor {read.name!r} of {who}")
        loaded[model] = tensor
    bar.update(1)
    if given and set(given) == set(loaded):
        return dict(given)
    try:
        records = None if held is None else []
        try:
            aligned = item.adapter.apply(loaded, item.adapter_values, held=records)
        finally:
            if records:
                held.extend((id(task), record) for record in records)
    except MetaGPTError:
        raise
    except Exception as error:
        if out_of_memory(error):
            raise
        raise MetaGPTError(
            f"MetaGPT: mergekit's {item.adapter.name} failed on tensor {item.base_read.name!r}: {error}"
        ) from error
    del loaded
    return aligned


def _task_norms(item, to_read, pairs, base_tensor, fetch, scratch, accumulator, found, done) -> None:
    """‖θ_t − θ₀‖² of each model's read of one task and ⟨δ_a, δ_b⟩ of each pair, into the
    accumulator, and the base's own NaN/Inf check. The models' tensors of the base's
    shape are held together, as the merge of that tensor holds them, so that the base is
    converted to float32 once for all of them and the inner products need no second
    read. A pair with a model that lacks the tensor is not counted (None)."""
    task, sparsifier = item.task, item.sparsifier
    base_read = item.base_read
    axis = task.output_weight.vocabulary_axis
    together = {}  # model -> (slot, name, tensor): same shape as the base, dense
    for model in to_read:
        key, read = item.keys[model], item.reads[model]
        pair = (task.base_model, model)
        tensor = fetch(model)
        if tensor is None:  # an optional tensor this model lacks
            found.dense.setdefault(pair, {})[key] = None
            done.add((pair, key))
            continue
        refuse_not_floating(read.name, model, tensor, task.base_model)
        _check_shape(read, base_read, axis, tensor, base_tensor)
        slot = (id(task), model) if sparsifier is not None else (pair, key)
        accumulator.labels.setdefault(model, f"model {model}")
        if sparsifier is not None:
            accumulator.add(model, slot, squared_delta(tensor, base_tensor, sparsifier, model, scratch), name=read.name,
                            dtype=tensor.dtype)
        else:
            done.add((pair, key))
            together[model] = (slot, read.name, tensor)
        del tensor
    order = list(together)
    counted = [(p, (order.index(p[0]), order.index(p[1]))) for p in pairs if p[0] in together and p[1] in together]
    norms, products, base_sum = task_vector_sums(
        [t for *_, t in together.values()], base_tensor, scratch, check_base=True, pairs=[ij for _, ij in counted]
    )
    accumulator.add(BASE, (id(task), base_read.key), base_sum, name=base_read.name, dtype=base_tensor.dtype)
    for (model, (slot, name, tensor)), value in zip(together.items(), norms):
        accumulator.add(model, slot, value, name=name, dtype=tensor.dtype)
    for ((a, b), _), value in zip(counted, products):
        triple = (task.base_model, a, b)
        accumulator.add(("pair", a, b), (triple, item.pair_keys[(a, b)]), value, name=item.reads[a].name)
    for a, b in pairs:
        triple, pair_key = (task.base_model, a, b), item.pair_keys[(a, b)]
        done.add((triple, pair_key))
        if a not in together or b not in together:
            found.products.setdefault(triple, {})[pair_key] = None
