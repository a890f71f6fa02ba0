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

A sharded model's every shard is listed too (its names): a name the merge reads that
another shard holds as well is read from whichever shard mergekit's loader has open, so
the two copies are compared (read whole, only then), and refused where they differ.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import zipfile
from typing import Dict, Hashable, Iterable, List, Optional, Tuple

from mergekit_metagpt.errors import MetaGPTError, one_line


#: How a git-lfs pointer file begins (a clone made without git-lfs holds these in place of
#: the weights).
LFS_POINTER = b"version https://git-lfs.github.com/spec/"


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
        with open(path, "rb") as handle:
            if handle.read(len(LFS_POINTER)) == LFS_POINTER:
                return "is a git-lfs pointer, not the weights (run `git lfs pull` in its repository)"
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
    meta device: the tensors' data is not read (a legacy pre-zip file is read whole, once
    per check: the file, names and dtype checks share it). (Not mergekit's lazy unpickler,
    which takes fewer types, e.g. no ``nn.Parameter``, and patches torch for the whole
    process while it runs.)"""
    stat = os.stat(path)
    return _meta_shard(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _meta_shard(path: str, size: int, mtime_ns: int):
    return _load_shard(path, "meta")


def _load_shard(path: str, device: str):
    """A .bin shard's dict as mergekit's per-shard loaders read it (top-level names; a
    torch.save zip archive memory-mapped, the legacy format, which cannot be, read whole)."""
    import torch

    return torch.load(path, map_location=device, weights_only=True, mmap=zipfile.is_zipfile(path))


def _file_keys(path: str) -> frozenset:
    """The tensor names a shard holds, as mergekit's loader of that shard finds them."""
    if path.lower().endswith(".safetensors"):
        import safetensors

        with safetensors.safe_open(path, framework="pt") as handle:
            return frozenset(handle.keys())
    shard = _read_pickle(path)
    return frozenset(shard) if isinstance(shard, dict) else frozenset()


def stored_shape(path: str, name: str) -> List[int]:
    """A tensor's shape from its safetensors file's header (no data read)."""
    import safetensors

    with safetensors.safe_open(path, framework="pt") as handle:
        return list(handle.get_slice(name).get_shape())


def _tensor_in(path: str, name: str):
    if path.lower().endswith(".safetensors"):
        import safetensors

        with safetensors.safe_open(path, framework="pt") as handle:
            return handle.get_tensor(name)
    return _load_shard(path, "cpu")[name]


def _bits(tensor):
    import torch

    return tensor.contiguous().reshape(-1).view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)


class _Copies:
    """Tensor names that several shards of one model's index hold, and whether their copies
    are alike, for one plan's check (each shard listed, each pair compared, once)."""

    def __init__(self):
        self._held: Dict[int, Dict[str, List[str]]] = {}  # id(index) -> name -> its files
        self._alike: Dict[tuple, bool] = {}

    def held(self, model, index) -> Dict[str, List[str]]:
        if id(index) not in self._held:
            holders: Dict[str, List[str]] = {}
            if len(index.shards) > 1:
                for shard in index.shards:
                    path = os.path.join(index.base_path, shard.filename)
                    if file_problem(path) is not None:  # named if the merge reads it
                        continue
                    try:
                        names = _file_keys(path)
                    except Exception as error:
                        raise MetaGPTError(
                            f"MetaGPT: cannot list the tensors of model {model}'s file {path}: {one_line(error)}"
                        ) from None
                    for name in names:
                        holders.setdefault(name, []).append(path)
            self._held[id(index)] = {n: files for n, files in holders.items() if len(files) > 1}
        return self._held[id(index)]

    def alike(self, model, name: str, a: str, b: str) -> bool:
        """Whether two files hold the same tensor under `name` (dtype, shape and every bit):
        then whichever mergekit reads, it reads the same."""
        key = (name, a, b)
        if key not in self._alike:
            import torch

            try:
                x, y = _tensor_in(a, name), _tensor_in(b, name)
                self._alike[key] = x.dtype == y.dtype and x.shape == y.shape and torch.equal(_bits(x), _bits(y))
            except Exception as error:
                raise MetaGPTError(
                    f"MetaGPT: model {model} holds tensor {name!r} in {a} and {b}, and its copies could not be "
                    f"compared: {one_line(error)}"
                ) from None
        return self._alike[key]

    def check(self, model, index, name: str, path: str) -> None:
        """Refuse a tensor the merge reads that another file of the same index holds, with other
        bits: mergekit's loader reads a name from whichever shard it has open if that shard
        holds it, so which copy is read depends on the order of reads, and the pre-pass and
        the merge read in other orders."""
        others = [other for other in self.held(model, index).get(name, ())
                  if other != path and not self.alike(model, name, path, other)]
        if others:
            raise MetaGPTError(
                f"MetaGPT: model {model} holds tensor {name!r} in {len(others) + 1} files: {path} (where its "
                f"index puts it) and {', '.join(others)}. mergekit reads a tensor from whichever of a model's "
                f"files it has open, so the merge and its λ could each take another copy; remove the copies "
                f"the index does not list (or save the model again)"
            )


def _stored_dtypes(path: str) -> Dict[str, str]:
    """Each tensor's dtype as the file stores it (safetensors' header: "BF16", "I8" …;
    a zip .bin's: "bfloat16", "int8" …), before any cast of the recipe's. (Not of a legacy
    pre-zip .bin, which would be read whole for it.)"""
    if path.lower().endswith(".safetensors"):
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        return {name: str(entry.get("dtype")) for name, entry in header.items()
                if name != "__metadata__" and isinstance(entry, dict)}
    if not zipfile.is_zipfile(path):
        return {}
    shard = _read_pickle(path)
    return {name: str(tensor.dtype).removeprefix("torch.") for name, tensor in shard.items()
            if hasattr(tensor, "dtype")} if isinstance(shard, dict) else {}


def _floating(dtype: Optional[str]) -> bool:
    return dtype is not None and dtype.upper().startswith(("F", "BF"))


#: Stored dtypes of quantization codes (bitsandbytes' int8, 8-bit schemes): a float weight
#: stored so is not its value. (bool masks and int64 ids beside a float-stored base are not
#: codes: their cast is the value.)
CODES = {"I8", "U8", "INT8", "UINT8"}


def check_files_open(task_reads: Iterable[Tuple[Hashable, Dict[Hashable, object]]]) -> None:
    """Refuse a plan one of whose checkpoint files is missing or damaged, naming the
    model, the file and a tensor the merge reads from it; one of whose read tensors is
    held by two files of one model; or one reading a model's tensor stored as 8-bit integers
    where the base's is floating point (a quantized checkpoint without a
    `quantization_config`: the recipe's dtype cast would merge its codes as weights).
    `task_reads`: each planned task's base model and reads (``plan_inputs.task_reads``).
    Reads that mergekit cannot place (no loader, a name the checkpoint lacks) are left to
    the merge to report."""
    seen: Dict[str, None] = {}
    copies = _Copies()
    dtypes: Dict[str, Dict[str, str]] = {}
    for base, reads in task_reads:
        stored = {}
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
            copies.check(model, read.loader.index, name, path)
            if path not in dtypes:
                try:
                    dtypes[path] = _stored_dtypes(path)
                except Exception:  # opened above: a layout this check does not know
                    dtypes[path] = {}
            stored[model] = (dtypes[path].get(name), name, path)
        base_dtype = stored.get(base, (None,))[0]
        for model, (dtype, name, path) in stored.items():
            if model != base and _floating(base_dtype) and dtype is not None and dtype.upper() in CODES:
                raise MetaGPTError(
                    f"MetaGPT: tensor {name!r} of model {model} is stored as {dtype} in {path}, where the base "
                    f"model's is {base_dtype}: 8-bit integers are a quantized checkpoint's codes, not its weights "
                    f"(the recipe's dtype cast does not dequantize them); merge its unquantized checkpoint"
                )
