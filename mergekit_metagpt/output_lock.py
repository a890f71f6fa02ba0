"""One MetaGPT merge at a time into an output folder.

Two merges writing into one folder at once (two shells, two jobs of a scheduler, two threads
of a pipeline) leave a mix of both runs' shards, and the record and card of whichever ended
last beside them. A MetaGPT ``run_merge`` holds an exclusive ``flock`` on the output folder
itself (no file is added to it) from before mergekit makes or writes anything there until
its record, card and config are written; a second one finds it held and is refused at once,
naming the folder, before it reads or writes anything (its checks, which may merge a LoRA,
come after). Released when the merge ends, or its process does (killed included); a child
forked meanwhile (a multiprocessing pool) closes its copy, so that it does not keep the
lock held after the merge. Where no lock can be had (no ``fcntl``: Windows; a file system
where ``flock`` on a folder fails, as on NFS, which emulates it with write locks), the merge
goes on unguarded, as stock mergekit's do, with an INFO line. Merges by other methods, and ``mergekit-pytorch`` (no
``run_merge``), take no lock.
"""

from __future__ import annotations

import contextlib
import logging
import os

from mergekit_metagpt.errors import MetaGPTError
from mergekit_metagpt.fork_safety import close_after_fork

LOG = logging.getLogger("mergekit_metagpt")

#: the descriptors of the folders this process holds locked
_HELD: set = set()
close_after_fork(_HELD)  # a forked child does not keep the lock held after the merge


@contextlib.contextmanager
def held(out_path):
    """The lock on `out_path` (made where missing, as mergekit makes it) while the block runs."""
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    if fcntl is None or not isinstance(out_path, (str, os.PathLike)) or not os.fspath(out_path):
        yield
        return
    folder = os.fspath(out_path)
    try:
        os.makedirs(folder, exist_ok=True)
        handle = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as error:  # mergekit says it, in its words, when it makes the folder
        LOG.debug("MetaGPT: no lock on the output folder %s (%s)", folder, error)
        yield
        return
    _HELD.add(handle)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MetaGPTError(
                f"another MetaGPT merge is writing into {folder} now (in this process or another): its "
                f"weights and yours would mix; wait for it to end, or merge into another folder"
            ) from None
        except OSError as error:  # no flock on this file system: unguarded
            LOG.info("MetaGPT: no lock on the output folder %s (%s): a second merge into it at the same "
                     "time would not be refused", folder, error.strerror or error)
        yield
    finally:
        if handle in _HELD:  # else closed in a forked child, whose number may be another file's now
            _HELD.discard(handle)
            os.close(handle)
