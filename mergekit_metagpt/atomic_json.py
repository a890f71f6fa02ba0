"""Write a JSON file all at once: to a temporary file in the same folder, then renamed.

A reader (or an interrupted writer) never sees half a file; on any error, including
Ctrl-C, the temporary file is removed and the old file (if any) stays.
"""

from __future__ import annotations

import json
import os
import tempfile


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import: setting it later would race with other threads


def write_json(path: str, data, indent=None, fsync: bool = False) -> None:
    """Raises OSError (the caller decides whether that is only a warning)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:  # closes fd whatever follows
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # as open() would create it (mkstemp makes 0600)
            json.dump(data, f, indent=indent)
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
