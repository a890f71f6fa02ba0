"""Module state made afresh in a child process after ``os.fork`` (multiprocessing's "fork"
start method, a Jupyter kernel's subprocess, a pipeline's worker pool): a thread of the
parent other than the forking one may have held a lock at that moment, and the child,
which has only the forking thread, would wait on it for ever."""

from __future__ import annotations

import os
import sys
import threading
from typing import Callable


def renew_after_fork(module_name: str, *names: str, factory: Callable[[], object] = threading.Lock) -> None:
    """After a fork, in the child: each of the module's `names` set to ``factory()`` (a new
    lock, or an empty container: functions read module globals when called, so they see it)."""
    if not hasattr(os, "register_at_fork"):  # not POSIX: no fork
        return

    def renew() -> None:
        module = sys.modules.get(module_name)
        if module is not None:
            for name in names:
                setattr(module, name, factory())

    os.register_at_fork(after_in_child=renew)


def close_after_fork(handles: set) -> None:
    """After a fork, in the child: each file descriptor in `handles` (a set its module keeps
    and never replaces: the descriptors of the ``flock`` locks it holds) closed and the set
    emptied. A flock lasts while any copy of its descriptor is open: a child that kept its
    copies would keep the parent's lock held after the parent released it."""
    if not hasattr(os, "register_at_fork"):  # not POSIX: no fork
        return

    def close() -> None:
        for handle in list(handles):
            try:
                os.close(handle)
            except OSError:
                pass
        handles.clear()

    os.register_at_fork(after_in_child=close)
