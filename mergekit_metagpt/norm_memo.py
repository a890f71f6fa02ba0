"""The pre-pass's norms known in this process (a memo keyed as the disk cache,
``norm_cache``), and writes of new ones merged with what the cache holds by then."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Dict, Optional, Tuple

from mergekit_metagpt.fork_safety import renew_after_fork

#: entries each memo keeps, the least recently used dropped first: a process that merges
#: checkpoints rewritten between merges (each version another key) keeps no more than this;
#: a dropped entry is read from the disk cache again when it is next asked for
MEMO_ENTRIES = 256

_MEMO: "OrderedDict[Tuple[str, str], Dict[str, Optional[float]]]" = OrderedDict()
_MEMO_LOCK = threading.Lock()
renew_after_fork(__name__, "_MEMO_LOCK")


def _keep(memo, key, value) -> None:
    """`memo[key] = value`, as its most recent entry, within MEMO_ENTRIES (under the lock)."""
    memo[key] = value
    memo.move_to_end(key)
    while len(memo) > MEMO_ENTRIES:
        memo.popitem(last=False)


def clear_memo() -> None:
    with _MEMO_LOCK:
        _MEMO.clear()
        _PRODUCTS_MEMO.clear()


def known(base_key: str, model_key: str, want: Optional[str] = None) -> Dict[str, Optional[float]]:
    """{read key: squared norm} known for a (base, model) pair, from the memo or the cache;
    `want`: a read key the caller looks for, the cache read again where the memo lacks it
    (see `_known`)."""
    from mergekit_metagpt import norm_cache

    if not norm_cache.enabled():
        return {}
    return _known(_MEMO, (base_key, model_key), lambda: norm_cache.load(base_key, model_key), want)


def _known(memo, key, load, want: Optional[str] = None) -> Dict[str, Optional[float]]:
    """What `memo` holds under `key`, loaded from the cache (outside the lock) at its first
    use, or again where it lacks the read key `want` (another process sharing the cache
    folder may have added reads to the entry since this one loaded it: a driver process
    merging after its workers ran the pre-pass again); what the memo holds wins over the
    load (a value another thread stored meanwhile is kept, not overwritten)."""
    with _MEMO_LOCK:
        hit = memo.get(key)
        if hit is not None:
            memo.move_to_end(key)
    if hit is None or (want is not None and want not in hit):
        loaded = load() or {}
        with _MEMO_LOCK:
            hit = {**loaded, **memo.get(key, {})}
            _keep(memo, key, hit)
    return dict(hit)


def remember(base_key, model_key, norms, labels) -> None:
    """Keep the pair's norms in the memo and write them to its cache entry."""
    from mergekit_metagpt import norm_cache

    if not norm_cache.enabled():
        return
    # merged with what another pair of the same checkpoints stored (their keys differ by
    # token map), and with what is on disk
    _merge_and_store(
        _MEMO, (base_key, model_key), norms,
        load=lambda: norm_cache.load(base_key, model_key, quiet=True),
        store=lambda merged: norm_cache.store(base_key, model_key, merged, labels=labels),
    )


def _merge_and_store(memo, key, values, load, store) -> bool:
    """Write one cache entry: what it holds on disk now (another process may have added
    reads since this one looked), what this process knows, and the new values; one writer
    at a time, in this process and in all processes sharing the cache folder
    (``norm_cache.folder_lock``). False where it could not be written."""
    from mergekit_metagpt import norm_cache

    with norm_cache.folder_lock():
        on_disk = load() or {}
        with _MEMO_LOCK:
            merged = {**on_disk, **memo.get(key, {}), **values}
            _keep(memo, key, merged)
        return store(merged)


_PRODUCTS_MEMO: "OrderedDict[Tuple[str, str, str], Dict[str, Optional[float]]]" = OrderedDict()


def known_products(base_key: str, a_key: str, b_key: str, want: Optional[str] = None) -> Dict[str, Optional[float]]:
    from mergekit_metagpt import norm_cache

    if not norm_cache.enabled():
        return {}
    triple = (base_key, a_key, b_key)
    return _known(_PRODUCTS_MEMO, triple, lambda: norm_cache.load_products(*triple), want)


def remember_products(fingerprints, products, labels) -> bool:
    """Keep and write the triple's inner products; False where the entry could not be
    written (or the cache is off)."""
    from mergekit_metagpt import norm_cache

    if not norm_cache.enabled():
        return False
    return _merge_and_store(
        _PRODUCTS_MEMO, tuple(fingerprints), products,
        load=lambda: norm_cache.load_products(*fingerprints, quiet=True),
        store=lambda merged: norm_cache.store_products(*fingerprints, merged, labels=labels),
    )
