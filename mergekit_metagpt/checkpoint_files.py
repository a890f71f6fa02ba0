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
from typing import Dict, Hashable, Iterable, List, Optional, Tuple

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


def _read_pickle(path: str):
    """Unpickle a torch.save archive as mergekit's loader does (``weights_only``), onto the
    meta device: the tensors' data is not read. (Not mergekit's lazy unpickler, which
    takes fewer types, e.g. no ``nn.Parameter``, and patches torch for the whole process
    while it runs.)"""
    import torch

    return torch.load(path, map_location="meta", weights_only=True, mmap=True)


def _file_keys(path: str) -> Optional[frozenset]:
    """The tensor names a checkpoint file holds (as mergekit's loader of it finds them), or
    None where it does not open (then `file_problem` names it, if the merge reads it)."""
    try:
        if path.lower().endswith(".safetensors"):
            import safetensors

            with safetensors.safe_open(path, framework="pt") as handle:
                return frozenset(handle.keys())
        shard = _read_pickle(path)
        if isinstance(shard, dict) and "state_dict" in shard:  # as mergekit's loaders
            shard = shard["state_dict"]
        return frozenset(shard) if isinstance(shard, dict) else None
    except Exception:
        return None


def _tensor_in(path: str, name: str):
    if path.lower().endswith(".safetensors"):
        import safetensors

        with safetensors.safe_open(path, framework="pt") as handle:
            return handle.get_tensor(name)
    import torch

    shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return (shard.get("state_dict", shard) if isinstance(shard, dict) else shard)[name]


def _same_tensor(name: str, a: str, b: str) -> bool:
    """Whether two files hold the same tensor under `name` (dtype, shape and every bit): then
    whichever mergekit reads, it reads the same."""
    import torch

    try:
        x, y = _tensor_in(a, name), _tensor_in(b, name)
    except Exception:
        return False
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))


def _held_twice(index) -> Dict[str, List[str]]:
    """The names that two or more files of a mergekit index hold (name -> those files)."""
    holders: Dict[str, List[str]] = {}
    if len(index.shards) > 1:
        for shard in index.shards:
            path = os.path.join(index.base_path, shard.filename)
            for name in _file_keys(path) or ():
                holders.setdefault(name, []).append(path)
    return {name: files for name, files in holders.items() if len(files) > 1}


def _check_one_copy(model, name: str, path: str, held_twice: Dict[str, List[str]]) -> None:
    """Refuse a tensor the merge reads that another file of the same index holds too: mergekit's
    loader reads a name from whichever shard it has open if that shard holds it, so which copy
    is read depends on the order of reads, and the pre-pass and the merge read in other orders."""
    others = [other for other in held_twice.get(name, ()) if other != path and not _same_tensor(name, path, other)]
    if others:
        raise MetaGPTError(
            f"MetaGPT: model {model} holds tensor {name!r} in two files: {path} (where its index "
            f"puts it) and {others[0]}. mergekit reads a tensor from whichever of a model's files it "
            f"has open, so the merge and its λ could each take another copy; remove the copy "
            f"the index does not list (or save the model again)"
        )


def check_files_open(task_reads: Iterable[Dict[Hashable, object]]) -> None:
    """Refuse a plan one of whose checkpoint files is missing or damaged, naming the
    model, the file and a tensor the merge reads from it, or one of whose read tensors is
    held by two files of one model. `task_reads`: each planned
    task's reads (``plan_inputs.task_reads``). Reads that mergekit cannot place (no
    loader, a name the checkpoint lacks) are left to the merge to report."""
    seen: Dict[str, None] = {}
    held_twice: Dict[str, Dict[str, List[str]]] = {}  # index's folder -> `_held_twice`
    for reads in task_reads:
        for model, read in reads.items():
            try:
                found = shard_path(read)
            except Exception:  # no loader for it here: the merge reports it in its words
                continue
            if found is None:
                continue
            path, name = found
            if path not in seen:
                seen[path] = None
                problem = file_problem(path)
                if problem is not None:
                    raise MetaGPTError(
                        f"MetaGPT: cannot read model {model}: its file {path} (holding tensor "
                        f"{name!r}) {problem}"
                    )
            index = read.loader.index
            if index.base_path not in held_twice:
                held_twice[index.base_path] = _held_twice(index)
            _check_one_copy(model, name, path, held_twice[index.base_path])
