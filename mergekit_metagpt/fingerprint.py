"""A key for a checkpoint's current contents, computed without reading whole files.

For each shard file, in shard order:

- a file in a Hugging Face hub cache (a ``models--*/blobs/<hash>`` file, usually reached through
  a snapshot symlink) is named by the hash of its content when huggingface_hub wrote it;
  but writing to a snapshot's path (``cp`` onto the symlink) rewrites the blob under
  its old name. Its key is that name, its size and ``st_mtime_ns``, and the samples
  below: no inode, device or ctime, so that a copy of the cache that keeps mtimes
  (``cp -a``, ``rsync -a``) keeps the key;
- any other file: its name, size, ``st_mtime_ns``, ``st_ctime_ns``, inode and device,
  its safetensors header (for other formats, e.g. ``.bin``, its first 64 KiB), and its
  last 64 KiB (a file of 128 KiB or less: all of it). Rewriting a file in place changes its
  ctime, which no user tool can set back (``touch``/``os.utime`` restore mtime only);
  a copy has another inode. Both miss, and the norms are computed again;

and the index's map of tensor names to shard files, in its order (an index edited alone
changes which tensor mergekit reads for a name).

The in-process memo and the on-disk norm cache use this same key.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from typing import Tuple

SAMPLE_BYTES = 64 * 1024
#: The most of a safetensors header read (the format's own limit is 100 MB; a damaged
#: length field would otherwise have the whole file read into memory).
HEADER_LIMIT = 100_000_000
_BLOB = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")


def checkpoint_files(index) -> Tuple[str, ...]:
    """The shard files of a mergekit ShardedTensorIndex, in shard order."""
    return tuple(os.path.join(index.base_path, shard.filename) for shard in index.shards)


def hub_blob_name(path: str):
    """The content hash naming a Hugging Face cache blob (``models--<org>--<name>/blobs/<hash>``),
    or None for other files (a folder of another shape with a ``blobs/`` in it, e.g. one
    unpacked from an archive, gets the stricter key of any file)."""
    real = os.path.realpath(path)
    name = os.path.basename(real)
    folder = os.path.dirname(real)
    if (os.path.basename(folder) == "blobs" and os.path.basename(os.path.dirname(folder)).startswith("models--")
            and _BLOB.match(name)):
        return name
    return None


def file_key(path: str) -> str:
    blob = hub_blob_name(path)
    digest = hashlib.sha256()
    st = os.stat(path)
    if blob is not None:  # no inode, device or ctime: a copy of the cache keeps the key
        digest.update(f"{blob}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        kind = "blob"
    else:
        digest.update(
            f"{os.path.basename(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|"
            f"{st.st_ino}|{st.st_dev}\n".encode()
        )
        kind = "file"
    with open(path, "rb") as handle:
        if st.st_size <= 2 * SAMPLE_BYTES:  # small: all of it (a same-size rewrite within
            digest.update(handle.read())    # one tick of a coarse clock keeps the stat)
            return f"{kind}:{digest.hexdigest()}"
        if path.endswith(".safetensors") and st.st_size >= 8:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            digest.update(handle.read(min(header_len, st.st_size - 8, HEADER_LIMIT)))
        else:
            digest.update(handle.read(SAMPLE_BYTES))
        handle.seek(st.st_size - SAMPLE_BYTES)  # the tail (the file is larger than two samples)
        digest.update(handle.read(SAMPLE_BYTES))
    return f"{kind}:{digest.hexdigest()}"


def checkpoint_key(index) -> str:
    """One hash over every shard's file key and the index's map of tensor names to files.

    The map counts on its own: an ``index.json`` edited alone (a hub revision that only
    changes it keeps every shard blob) changes which tensor mergekit reads for a name,
    e.g. the tied ``embed_tokens`` for an ``lm_head`` the map no longer lists."""
    digest = hashlib.sha256()
    for path in checkpoint_files(index):
        digest.update(file_key(path).encode() + b"\n")
    for name, filename in (getattr(index, "tensor_paths", None) or {}).items():
        digest.update(f"{name}\0{filename}\n".encode())
    return digest.hexdigest()


def changed_since(keys) -> list:
    """The models of `keys` (model -> (its checkpoint's index, its key then)) whose files'
    key is another now (rewritten, replaced, or gone)."""
    changed = []
    for model, (index, key) in keys.items():
        try:
            now = checkpoint_key(index)
        except OSError:  # gone
            now = None
        if now != key:
            changed.append(model)
    return changed
