"""Write a file all at once: to a temporary file in the same folder, then renamed.

A reader (or an interrupted writer) never sees half a file; on any error, including
Ctrl-C or a full disk, the temporary file is removed and the old file (if any) stays.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from typing import IO, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import: setting it later would race with other threads


def write_atomically(path: str, write: Callable[[IO], None], binary: bool = False, fsync: bool = False) -> None:
    """`write(f)` fills the file (text in UTF-8, or bytes with `binary`). Raises OSError
    (the caller decides whether that is only a warning).

    A symlink is followed (the file it names is replaced, the link stays) and an existing
    file keeps its permissions; what is not a regular file (a named pipe) is replaced."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # none yet (or a link to none)
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        mode = None
    path = os.path.realpath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        # closes fd whatever follows
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            # as open() would create it (mkstemp makes 0600), or as the file it replaces
            if hasattr(os, "fchmod"):  # not on Windows before Python 3.13
                os.fchmod(f.fileno(), stat.S_IMODE(mode) if mode is not None else 0o666 & ~_UMASK)
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_json(path: str, data, indent=None, fsync: bool = False) -> None:
    write_atomically(path, lambda f: json.dump(data, f, indent=indent), fsync=fsync)


def write_text(path: str, text: str) -> None:
    write_atomically(path, lambda f: f.write(text))
