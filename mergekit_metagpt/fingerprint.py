"""Identify a checkpoint's current contents cheaply: files, sizes, mtimes, headers."""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Tuple

SAMPLE_BYTES = 64 * 1024


def checkpoint_files(index) -> Tuple[str, ...]:
    """The shard files of a mergekit ShardedTensorIndex, in shard order."""
    return tuple(
        os.path.join(index.base_path, shard.filename) for shard in index.shards
    )


def stat_signature(index) -> Tuple[Tuple[str, int, int, int], ...]:
    """(path, size, mtime_ns, inode) of every shard: changes when a file is rewritten."""
    signature = []
    for path in checkpoint_files(index):
        st = os.stat(path)
        signature.append((os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(signature)


def content_fingerprint(index) -> str:
    """A hash of the stat signature, each safetensors header, and sampled data bytes.

    Used as the on-disk cache key: a changed checkpoint cannot hit a stale entry
    unless its sizes, mtimes, headers and sampled bytes all stay the same.
    """
    digest = hashlib.sha256()
    for path, size, mtime_ns, _inode in stat_signature(index):
        digest.update(f"{os.path.basename(path)}|{size}|{mtime_ns}\n".encode())
        with open(path, "rb") as handle:
            if path.endswith(".safetensors") and size >= 8:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                digest.update(handle.read(min(header_len, size - 8)))
            else:
                digest.update(handle.read(SAMPLE_BYTES))
            if size > SAMPLE_BYTES:
                handle.seek(max(0, size - SAMPLE_BYTES))
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()
