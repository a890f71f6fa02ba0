"""On-disk cache of squared norms for (base checkpoint, model checkpoint) pairs.

Location: ``$MERGEKIT_METAGPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/mergekit-metagpt/norms``
(``~/.cache/...``). ``MERGEKIT_METAGPT_CACHE=0`` turns it off (and the in-process memo
with it). Entries are keyed by both checkpoints' keys (``fingerprint.checkpoint_key``),
so a changed checkpoint cannot hit a stale entry. One entry holds, for each read of the
merge plan (which tensor of the base against which tensor of the model, in which
dtype), its squared norm; entries grow as other recipes read other tensors of the same pair. Writes go to a
temporary file that is renamed into place, so an interrupted merge never leaves a
half-written entry; a corrupt or unwritable cache only warns and falls back to computing.
A write reads the entry again and merges it with what it adds, holding the folder's lock
file (``.lock``, ``flock``) so that no other process writes in between.
An entry is read and replaced as a file of its own: a symlink, folder or named pipe at its
name is ignored (a symlink never followed), and a folder the cache makes is private (0700).
Corrupt includes values that no pre-pass writes: a number that is not finite (or does not fit
a float), and a negative squared norm. An entry of an older format is a miss.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import stat
import threading
import time
from typing import Dict, Optional

from mergekit_metagpt.atomic_files import write_json
from mergekit_metagpt.env import switched_off
from mergekit_metagpt.fork_safety import close_after_fork, renew_after_fork

LOG = logging.getLogger("mergekit_metagpt")
# 5: every norm summed one way (`norms.canonical_squared_sum`; 4's norms had last bits that
#    depended on the models read beside it, their number or a float64 one among them, and on
#    the thread count);
# 4: float64 checkpoints' norms in float64 (3 summed their differences in float32);
# 3: no notes (2 held the leading-rows notes of resized vocabularies, a rule now gone)
FORMAT = 5


def enabled() -> bool:
    return not switched_off("MERGEKIT_METAGPT_CACHE")


def cache_dir() -> str:
    explicit = os.environ.get("MERGEKIT_METAGPT_CACHE_DIR")
    if explicit:  # "~/x" as a shell leaves it quoted (.env files, Docker's ENV): the home's, not
        # a folder named "~" here; a relative one, from the folder the process started in
        return os.path.abspath(os.path.expanduser(explicit))
    root = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(root):  # unset, empty or relative: ignored, as the XDG spec says
        root = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "mergekit-metagpt", "norms")


def make_folder() -> None:
    """The cache folder, made readable by this user only (its entries name the models merged)
    where it is new; an existing one (a team's shared folder) keeps its permissions."""
    os.makedirs(cache_dir(), mode=0o700, exist_ok=True)


def entry_path(base_fingerprint: str, model_fingerprint: str) -> str:
    key = hashlib.sha256(f"v{FORMAT}|{base_fingerprint}|{model_fingerprint}".encode()).hexdigest()
    return os.path.join(cache_dir(), f"{key}.json")


#: How long a write waits for another process's write (milliseconds each, normally); after
#: that (a process stopped while writing) it writes without the lock, as if there were none,
#: and so do the process's next writes to that folder for LOCK_GIVE_UP_S without waiting (a
#: merge writes T + T(T−1)/2 entries: 10 s each would add minutes).
LOCK_WAIT_S = 10.0
LOCK_GIVE_UP_S = 120.0
_GAVE_UP: Dict[str, float] = {}  # cache folder -> until when its writes do not wait


@contextlib.contextmanager
def folder_lock():
    """Held around a read-merge-write of an entry: an exclusive ``flock`` on the cache
    folder's ``.lock``, so that two processes finishing at the same moment do not drop each
    other's new reads, taken by one thread of the process at a time (on NFS, where Linux
    emulates ``flock`` with per-process locks, two threads would both hold it, and the
    first to finish would release it). Where it cannot be had (no ``fcntl``, a folder that
    cannot be written, a filesystem without locks, or a wait beyond ``LOCK_WAIT_S``) the
    write goes ahead without it: the worst case is then reads computed again, never a
    wrong value."""
    with _ONE_THREAD, _flock():
        yield


_ONE_THREAD = threading.Lock()


@contextlib.contextmanager
def _flock():
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    handle = None
    try:
        try:
            make_folder()
            # read-only: another user's lock file (0644) locks too; flock needs no write access
            handle = os.open(os.path.join(cache_dir(), ".lock"), _READ_FLAGS | os.O_CREAT, 0o666)
            with _HELD_LOCK:
                _HELD.add(handle)
            folder = cache_dir()
            gave_up = _GAVE_UP.get(folder, 0.0) > time.monotonic()
            deadline = time.monotonic() + (0.0 if gave_up else LOCK_WAIT_S)
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    _GAVE_UP.pop(folder, None)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        if not gave_up:
                            LOG.warning("MetaGPT: the norm cache at %s stayed locked for %.0f s; writing without "
                                        "the lock (and without waiting for it for the next %.0f s)",
                                        folder, LOCK_WAIT_S, LOCK_GIVE_UP_S)
                        _GAVE_UP[folder] = time.monotonic() + LOCK_GIVE_UP_S
                        break
                    time.sleep(0.01)
        except OSError:  # unwritable folder, no locks here: the write itself warns if it fails
            pass
        yield
    finally:
        if handle is not None:
            with _HELD_LOCK:
                _HELD.discard(handle)
            os.close(handle)  # releases the lock


# Lock descriptors open in this process: a child forked while one is held would share it
# (a flock belongs to the open file) and keep it until it exits; the child closes them.
_HELD: set = set()
_HELD_LOCK = threading.Lock()


renew_after_fork(__name__, "_ONE_THREAD", "_HELD_LOCK")  # a thread of the parent may have held one

close_after_fork(_HELD)  # the child's copies of the parent's lock descriptors


#: Opening an entry: a symlink is not followed (entries are files the plugin writes; one
#: planted in the folder must not make it read, or later replace, a file elsewhere), nor
#: does a named pipe block the open (it waited for a writer forever).
_READ_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_BINARY", 0))  # (Windows: no newline translation)


def _read(path: str, quiet: bool = False):
    """The entry's JSON, or None if absent or unreadable (with a warning: for an entry
    that is not JSON, nested beyond Python's reach, a symlink or not a file, each time; for
    one the system cannot read, e.g. a cache folder that is not a folder, once per folder
    and kind of error)."""
    try:
        fd = os.open(path, _READ_FLAGS)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a named pipe, a folder
                raise ValueError("not a file")
            if hasattr(os, "set_blocking"):
                os.set_blocking(fd, True)  # a file: read as any other
            f = open(fd, encoding="utf-8")
        except BaseException:
            os.close(fd)
            raise
        with f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError) as error:
        if not quiet:
            LOG.warning("MetaGPT: ignoring unreadable norm cache entry %s (%s); recomputing", path,
                        "nested too deeply" if isinstance(error, RecursionError) else error)
        return None
    except OSError as error:
        if error.errno == errno.ELOOP and os.path.islink(path):
            if not quiet:
                LOG.warning("MetaGPT: ignoring norm cache entry %s: a symbolic link (the cache's entries "
                            "are files it writes); recomputing", path)
            return None
        if not quiet:
            _warn_once(path, error, "MetaGPT: could not read the norm cache in %s (%s); computing the norms")
        return None


def _values(mapping, nonnegative: bool) -> Optional[Dict[str, Optional[float]]]:
    """{key: float or None} of an entry's values, or None if one is not what a pre-pass
    writes: None, or a finite number (not negative, for squared norms)."""
    if not isinstance(mapping, dict):
        return None
    out: Dict[str, Optional[float]] = {}
    for key, value in mapping.items():
        if value is None:
            out[str(key)] = None
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        try:
            number = float(value)
        except OverflowError:  # an int beyond float's range
            return None
        if not math.isfinite(number) or (nonnegative and number < 0.0):
            return None
        out[str(key)] = number
    return out


def _load_entry(path: str, field: str, nonnegative: bool, identity: dict, quiet: bool):
    """The entry's `field` values, or None on a miss: absent, or (with a warning unless
    `quiet`) corrupt, of another format or another identity (`identity`: its fields)."""
    data = _read(path, quiet)
    if data is None:
        return None
    values = _values(data.get(field), nonnegative) if isinstance(data, dict) else None
    if values is None or any(data.get(name) != value for name, value in identity.items()):
        if not quiet:
            LOG.warning("MetaGPT: ignoring corrupt norm cache entry %s; recomputing", path)
        return None
    return values


def _write_entry(path: str, payload: dict) -> bool:
    """Written as a file of its own: a symlink at the entry's name is replaced, not followed.
    False where it could not be written (warned)."""
    try:
        make_folder()
        write_json(path, payload, fsync=True, follow_links=False)
    except OSError as error:
        _write_failed(path, error)
        return False
    return True


def load(base_fingerprint: str, model_fingerprint: str, quiet: bool = False) -> Optional[Dict[str, Optional[float]]]:
    """{read key: squared norm or None}, or None on a miss (absent, corrupt, other format);
    ``quiet``: no warning (a re-read before a write)."""
    if not enabled():
        return None
    return _load_entry(entry_path(base_fingerprint, model_fingerprint), "norms", True,
                       {"format": FORMAT, "base": base_fingerprint, "model": model_fingerprint}, quiet)


def store(
    base_fingerprint: str,
    model_fingerprint: str,
    norms: Dict[str, Optional[float]],
    labels=("", ""),
) -> bool:
    """Write the entry (callers pass everything known for the pair, old and new); False
    where it could not be written."""
    if not enabled():
        return False
    return _write_entry(entry_path(base_fingerprint, model_fingerprint), {
        "format": FORMAT,
        "base": base_fingerprint,
        "model": model_fingerprint,
        "base_model": str(labels[0]),
        "model_name": str(labels[1]),
        "norms": norms,
    })


_WARNED_FOLDERS = set()
_WARNED_LOCK = threading.Lock()
renew_after_fork(__name__, "_WARNED_LOCK")


def _write_failed(path: str, error: OSError) -> None:
    _warn_once(path, error, "MetaGPT: could not write the norm cache in %s (%s); continuing without it "
               "(set MERGEKIT_METAGPT_CACHE_DIR to a writable folder, or MERGEKIT_METAGPT_CACHE=0 "
               "to turn the cache off)")


def _warn_once(path: str, error: OSError, message: str) -> None:
    """One warning per cache folder, message, kind of error and process (a read-only home
    would otherwise warn for every entry of every merge); the repeats are logged at debug
    level. `message` takes the folder and the error."""
    folder = os.path.dirname(path)
    kind = (folder, message, type(error).__name__, getattr(error, "errno", None))  # e.g. no space, after no permission
    with _WARNED_LOCK:
        first = kind not in _WARNED_FOLDERS
        _WARNED_FOLDERS.add(kind)
    if first:
        LOG.warning(message, folder, error)
    else:
        LOG.debug("MetaGPT: norm cache entry %s: %s", path, error)


# -- inner products of pairs of task vectors (issue: see before you merge) -----------
# A separate kind of entry, keyed by the base's and both models' checkpoints, so that
# the norms' entries (and caches written before inner products existed) stay valid: a
# run that finds norms but no products has simply no products cached (a miss).
PRODUCTS_FORMAT = 2  # 2: float64 checkpoints' products in float64


def products_path(base_fingerprint: str, a_fingerprint: str, b_fingerprint: str) -> str:
    key = hashlib.sha256(
        f"products-v{PRODUCTS_FORMAT}|{base_fingerprint}|{a_fingerprint}|{b_fingerprint}".encode()
    ).hexdigest()
    return os.path.join(cache_dir(), f"{key}.json")


def load_products(base_fingerprint: str, a_fingerprint: str, b_fingerprint: str,
                  quiet: bool = False) -> Optional[Dict[str, Optional[float]]]:
    """{pair read key: ⟨δ_a, δ_b⟩ or None}, or None on a miss (absent, corrupt, other format)."""
    if not enabled():
        return None
    checkpoints = [base_fingerprint, a_fingerprint, b_fingerprint]
    return _load_entry(products_path(*checkpoints), "products", False,
                       {"format": PRODUCTS_FORMAT, "checkpoints": checkpoints}, quiet)


def store_products(
    base_fingerprint: str, a_fingerprint: str, b_fingerprint: str,
    products: Dict[str, Optional[float]], labels=("", "", ""),
) -> bool:
    """Write the entry (callers pass everything known for the triple, old and new); False
    where it could not be written."""
    if not enabled():
        return False
    return _write_entry(products_path(base_fingerprint, a_fingerprint, b_fingerprint), {
        "format": PRODUCTS_FORMAT,
        "checkpoints": [base_fingerprint, a_fingerprint, b_fingerprint],
        "models": [str(label) for label in labels],
        "products": products,
    })
