"""Write a file all at once: to a temporary file in the same folder, then renamed.

A reader (or an interrupted writer) never sees half a file; on any error, including
Ctrl-C or a full disk, the temporary file is removed and the old file (if any) stays.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from typing import IO, Callable


def write_atomically(path: str, write: Callable[[IO], None], binary: bool = False, fsync: bool = False,
                     follow_links: bool = True) -> None:
    """`write(f)` fills the file (text in UTF-8, or bytes with `binary`). Raises OSError
    (the caller decides whether that is only a warning).

    A symlink is followed (the file it names is replaced, the link stays), unless
    `follow_links` is False (files of the plugin's own, such as the norm cache's: the link
    itself is replaced); an existing file keeps its permissions, a new one has what open()
    would give it (the umask as it is now); what is not a regular file (a named pipe) is
    replaced."""
    try:
        mode = (os.stat if follow_links else os.lstat)(path).st_mode
    except OSError:  # none yet (or a link to none)
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        mode = None
    if follow_links:
        path = os.path.realpath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    # a file replaced: its mode from the start (a reader that opened a 0644 temporary file
    # before the fchmod below would read on, whatever the mode then)
    fd, tmp = new_file(folder, os.path.splitext(path)[1], 0o666 if mode is None else stat.S_IMODE(mode))
    try:
        # closes fd whatever follows
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            if mode is not None and hasattr(os, "fchmod"):  # not on Windows before Python 3.13
                os.fchmod(f.fileno(), stat.S_IMODE(mode))
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


def new_file(folder: str, suffix: str, mode: int = 0o666):
    """(descriptor, path) of a new file of a random name in `folder`, made as open() makes
    one (`mode` less the umask, which the system applies as it is at this moment: read
    once at import, a later ``os.umask`` in the process was missed; mkstemp makes 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        path = os.path.join(folder, f".tmp-{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(path, flags, mode), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {folder}")


def write_json(path: str, data, indent=None, fsync: bool = False, follow_links: bool = True) -> None:
    write_atomically(path, lambda f: json.dump(data, f, indent=indent), fsync=fsync, follow_links=follow_links)


def write_text(path: str, text: str) -> None:
    write_atomically(path, lambda f: f.write(text))
