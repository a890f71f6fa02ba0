"""Each checkpoint file a merge plan reads opens: checked once the plan is made, before
any tensor is read or written.

mergekit opens a shard when the merge first needs one of its tensors. A missing,
truncated or damaged shard then stops the merge midway with the file format's own
words (safetensors: "incomplete metadata, file not fully covered"), naming neither the
model nor the file, and a MetaGPT merge only after its pre-pass has read the other
models. Opening a safetensors file reads its header and checks that the file is as long
as the header says (milliseconds a shard). A ``torch.save`` (.bin) shard is a zip
archive: its directory, at the end of the file, is read (a truncated file has none),
and its pickle unpickled onto the meta device, which leaves the tensors' data unread.
"""

from __future__ import annotations

import os
import zipfile
from typing import Dict, Hashable, Iterable, Optional, Tuple

from mergekit_metagpt.errors import MetaGPTError, one_line


def shard_path(read) -> Optional[Tuple[str, str]]:
    """(the file holding the tensor `read` reads, its name in the checkpoint), or None
    where the checkpoint holds none of its names."""
    name = read.checkpoint_name()
    if name is None:
        return None
    index = read.loader.index
    shard = index.tensor_paths.get(name)
    return None if shard is None else (os.path.join(index.base_path, shard), name)


def file_problem(path: str) -> Optional[str]:
    """Why the checkpoint file at `path` cannot be read, or None."""
    if not os.path.isfile(path):
        return "is missing" if not os.path.exists(path) else "is not a file"
    try:
        if path.lower().endswith(".safetensors"):
            import safetensors

            with safetensors.safe_open(path, framework="pt"):
                pass
            return None
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if not magic:
            return "is empty"
        if magic.startswith(b"PK"):
            if not zipfile.is_zipfile(path):
                return "is a damaged or truncated zip archive (torch.save's format)"
            try:
                _read_pickle(path)
            except Exception as error:
                return f"does not unpickle (a damaged torch.save archive): {one_line(error)}"
    except Exception as error:
        return f"does not open: {one_line(error)}"
    return None


def _read_pickle(path: str) -> None:
    """Unpickle a torch.save archive as mergekit's loader does (``weights_only``), onto the
    meta device: the tensors' data is not read. (Not mergekit's lazy unpickler, which
    takes fewer types, e.g. no ``nn.Parameter``, and patches torch for the whole process
    while it runs.)"""
    import torch

    torch.load(path, map_location="meta", weights_only=True, mmap=True)


def check_files_open(task_reads: Iterable[Dict[Hashable, object]]) -> None:
    """Refuse a plan one of whose checkpoint files is missing or damaged, naming the
    model, the file and a tensor the merge reads from it. `task_reads`: each planned
    task's reads (``plan_inputs.task_reads``). Reads that mergekit cannot place (no
    loader, a name the checkpoint lacks) are left to the merge to report."""
    seen: Dict[str, None] = {}
    for reads in task_reads:
        for model, read in reads.items():
            try:
                found = shard_path(read)
            except Exception:  # no loader for it here: the merge reports it in its words
                continue
            if found is None or found[0] in seen:
                continue
            path, name = found
            seen[path] = None
            problem = file_problem(path)
            if problem is not None:
                raise MetaGPTError(
                    f"MetaGPT: cannot read model {model}: its file {path} (holding tensor "
                    f"{name!r}) {problem}"
                )
