"""The streaming pre-pass: global squared task-vector norms read from checkpoints.

Used by graph merges (``mergekit-yaml``, ``run_merge``), where the method sees one
tensor at a time and every ``TensorEntry.id`` is the input's ``ModelReference``.
Each tensor is read through mergekit's own loader, one at a time in the base's shard
order, so memory is bounded by a few tensors. Results are memoized per (base, model)
checkpoint state, keyed by the files' sizes, mtimes and inodes, so a later merge over
rewritten checkpoints never sees stale norms. A single lock makes the pre-pass run
once even when mergekit's multi-GPU executor calls the method from several threads.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from mergekit_metagpt.errors import MetaGPTError
from mergekit_metagpt.fingerprint import stat_signature
from mergekit_metagpt.scratch import thread_scratch
from mergekit_metagpt.norms import BASE, NormAccumulator, Sparsifier, base_check, squared_delta

LOG = logging.getLogger("mergekit_metagpt")

PerTensorNorms = Dict[str, float]


class PrepassStats:
    """Counters for tests and benchmarks."""

    def __init__(self):
        self.runs = 0
        self.cache_hits = 0
        self.tensors_read = 0
        self.bytes_read = 0
        self.seconds = 0.0


STATS = PrepassStats()
_LOCK = threading.Lock()
_MEMO: Dict[Tuple[tuple, tuple, object], PerTensorNorms] = {}


def clear_memo() -> None:
    with _LOCK:
        _MEMO.clear()


def checkpoint_norms(
    base, models: Sequence[Hashable], device: torch.device, sparsifier: Optional[Sparsifier] = None
) -> Dict[Hashable, PerTensorNorms]:
    """Per-tensor squared norms ‖θ_t − θ₀‖² for each model, from the checkpoints.

    With a sparsifier, the norms are those of the sparsified task vectors (not cached
    on disk: DARE's masks are random).
    """
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    base_index = cache.get(base).index
    base_sig = stat_signature(base_index)
    variant = sparsifier.densities if sparsifier is not None else None
    keys = {m: (base_sig, stat_signature(cache.get(m).index), variant) for m in models}
    with _LOCK:
        missing = [m for m in models if keys[m] not in _MEMO]
        if missing and sparsifier is not None:
            for model, norms in _stream_norms(base, missing, device, sparsifier).items():
                _MEMO[keys[model]] = norms
        elif missing:
            for model, norms in _norms_from_disk_or_stream(base, missing, device).items():
                _MEMO[keys[model]] = norms
        return {m: _MEMO[keys[m]] for m in models}


def _norms_from_disk_or_stream(base, models, device) -> Dict[Hashable, PerTensorNorms]:
    from mergekit.io.tasks import LoaderCache

    from mergekit_metagpt import norm_cache
    from mergekit_metagpt.fingerprint import content_fingerprint

    if not norm_cache.enabled():
        return _stream_norms(base, models, device)
    cache = LoaderCache()
    base_fp = content_fingerprint(cache.get(base).index)
    fps = {m: content_fingerprint(cache.get(m).index) for m in models}
    result = {}
    for model in models:
        cached = norm_cache.load(base_fp, fps[model])
        if cached is not None:
            STATS.cache_hits += 1
            result[model] = cached
            LOG.info("MetaGPT: norms of %s from the norm cache", model)
    todo = [m for m in models if m not in result]
    if todo:
        computed = _stream_norms(base, todo, device)
        for model in todo:
            norm_cache.store(base_fp, fps[model], computed[model], labels=(base, model))
        result.update(computed)
    return result


def _weight_infos(base) -> Dict[str, object]:
    """mergekit's WeightInfo for each tensor name (and alias) of the base's architecture."""
    from mergekit.architecture import arch_info_for_config
    from mergekit.io.tasks import LoaderCache

    try:
        config = base.config(trust_remote_code=LoaderCache().trust_remote_code)
        arch = arch_info_for_config(config)
        weights = arch.all_weights(config) if arch is not None else []
    except Exception as error:  # unknown architecture: fall back to exact names
        LOG.debug("MetaGPT: no architecture info for %s: %r", base, error)
        weights = []
    by_name = {}
    for weight in weights:
        for name in [weight.name, *(weight.aliases or ()), *(weight.tied_names or ())]:
            by_name.setdefault(name, weight)
    return by_name


def _resolve(name: str, weight, tensor_paths) -> Optional[str]:
    if name in tensor_paths:
        return name
    if weight is None:
        return None
    for candidate in [weight.name, *(weight.aliases or ()), *(weight.tied_names or ())]:
        if candidate in tensor_paths:
            return candidate
    return None


def _only_vocab_differs(weight, a: torch.Size, b: torch.Size) -> bool:
    axis = getattr(weight, "vocabulary_axis", None)
    if axis is None or len(a) != len(b) or axis >= len(a):
        return False
    return all(x == y for i, (x, y) in enumerate(zip(a, b)) if i != axis)


def _stream_norms(
    base, models: Sequence[Hashable], device: torch.device, sparsifier: Optional[Sparsifier] = None
) -> Dict[Hashable, PerTensorNorms]:
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader
    from mergekit.io.tasks import LoaderCache

    from mergekit_metagpt.progress import progress_bar

    cache = LoaderCache()
    # Private loaders over mergekit's indexes: the executor's loaders keep their
    # current shard, and no loader state is shared between threads.
    base_loader = LazyTensorLoader(cache.get(base).index, cache.lazy_unpickle)
    loaders = {
        m: LazyTensorLoader(cache.get(m).index, cache.lazy_unpickle) for m in models
    }
    weights = _weight_infos(base)
    scratch = thread_scratch()
    # safetensors shards are memory-mapped: pages touched stay resident (and count in
    # RSS) while a shard is open, so on CPU each shard is closed after every tensor.
    release_shards = torch.device(device).type == "cpu"
    accumulator = NormAccumulator([BASE, *models], {BASE: f"the base model {base}"})
    excluded: List[str] = []
    absent: Dict[Hashable, List[str]] = {m: [] for m in models}
    names = [name for shard in base_loader.index.shards for name in shard.contained_keys]
    dev = str(device)
    started = time.perf_counter()
    STATS.runs += 1
    LOG.info(
        "MetaGPT pre-pass: reading %d tensors of %s and %d model(s) on %s",
        len(names), base, len(models), dev,
    )
    with progress_bar(total=len(names), desc="MetaGPT norm pre-pass") as bar:
        for name in names:
            base_tensor = base_loader.get_tensor(name, device=dev)
            bar.update(1, nbytes=base_tensor.nbytes)
            STATS.tensors_read += 1
            STATS.bytes_read += base_tensor.nbytes
            if not base_tensor.is_floating_point():
                continue
            accumulator.add(BASE, name, base_check(base_tensor, scratch))
            weight = weights.get(name)
            for model in models:
                loader = loaders[model]
                source = _resolve(name, weight, loader.index.tensor_paths)
                if source is None:
                    if weight is not None and not weight.optional:
                        raise MetaGPTError(
                            f"MetaGPT: model {model} has no tensor {name!r}, which the "
                            f"base model {base} has and the architecture requires"
                        )
                    absent[model].append(name)
                    continue
                tensor = loader.get_tensor(source, device=dev)
                STATS.tensors_read += 1
                STATS.bytes_read += tensor.nbytes
                bar.update(0, nbytes=tensor.nbytes)
                if not tensor.is_floating_point():
                    raise MetaGPTError(
                        f"MetaGPT: tensor {name!r} of model {model} is {tensor.dtype}, "
                        f"but floating point in the base model {base}"
                    )
                if tensor.shape != base_tensor.shape:
                    if _only_vocab_differs(weight, tensor.shape, base_tensor.shape):
                        excluded.append(f"{name} ({model}: {tuple(tensor.shape)} vs "
                                        f"base {tuple(base_tensor.shape)})")
                        continue
                    raise MetaGPTError(
                        f"MetaGPT: shape mismatch for tensor {name!r}: model {model} has "
                        f"{tuple(tensor.shape)}, base model {base} has "
                        f"{tuple(base_tensor.shape)}"
                    )
                accumulator.add(
                    model, name, squared_delta(tensor, base_tensor, sparsifier, model, scratch)
                )
                del tensor
            del base_tensor
            if release_shards:
                for loader in (base_loader, *loaders.values()):
                    loader.flush()
    if excluded:
        LOG.warning(
            "MetaGPT: %d tensor(s) differ in vocabulary size from the base and are "
            "left out of the norms: %s", len(excluded), "; ".join(excluded),
        )
    for model, names_absent in absent.items():
        if names_absent:
            LOG.info(
                "MetaGPT: %d optional tensor(s) of the base are absent from %s and "
                "left out of its norm: %s", len(names_absent), model,
                ", ".join(names_absent),
            )
    norms = accumulator.finish()
    del norms[BASE]
    STATS.seconds += time.perf_counter() - started
    return norms
