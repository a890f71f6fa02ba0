"""Weight files of an earlier run left in a merge's output folder, which a loader may read
instead of the merge's own.

mergekit writes a merge's weights beside whatever the output folder holds and removes
nothing: a merge written as one ``model.safetensors`` into a folder that holds an earlier
run's ``model.safetensors.index.json`` and shards leaves them there, and mergekit's loader
(an index over a single file) then reads the earlier weights, as the next merge of
``mergekit-multi`` does from its intermediate folder; a sharded merge over an earlier single
``model.safetensors``, which transformers reads first, the same for transformers. Where
this happens, a MetaGPT merge (``run_merge``: every CLI command but ``mergekit-pytorch``)
warns, naming the files and the loader; leftovers no loader reads are said at INFO."""

import logging
import os
import re
from typing import Dict, List, Optional, Tuple

LOG = logging.getLogger("mergekit_metagpt")

#: a checkpoint's weight files as mergekit and transformers write them: one file, its shards
#: (mergekit's unfinished ``model-1.safetensors`` too) and the index
WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+(-of-\d+)?)?\.(safetensors|bin)(\.index\.json)?")

#: what each loader reads from a folder, first found first: mergekit 0.1.5's
#: ``ShardedTensorIndex.from_disk`` (an index over its file) and transformers'
#: ``from_pretrained`` (safetensors over .bin, a single file over an index)
LOADERS = (
    ("mergekit", ("model.safetensors.index.json", "model.safetensors",
                  "pytorch_model.bin.index.json", "pytorch_model.bin")),
    ("transformers", ("model.safetensors", "model.safetensors.index.json",
                      "pytorch_model.bin", "pytorch_model.bin.index.json")),
)

SHOWN = 4

Stamp = Tuple[int, int, int, int]


def weight_files(folder) -> Dict[str, Stamp]:
    """The weight files in `folder` (none where it is missing or unreadable), each with
    what tells a file rewritten apart (device, inode, size, modification time)."""
    if not isinstance(folder, (str, os.PathLike)):
        return {}
    found = {}
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if WEIGHT_FILE.fullmatch(entry.name) and entry.is_file():
                    st = entry.stat()
                    found[entry.name] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        return {}
    return found


def _read_by(folder, names) -> Optional[List[str]]:
    """The files a loader with the preference `names` reads in `folder`: its first entry
    found, with the shards an index names."""
    import json

    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return [name]
        try:
            with open(path, encoding="utf-8") as handle:
                shards = set(json.load(handle)["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            shards = set()
        return [name, *sorted(str(s) for s in shards)]
    return None


def _listed(names: List[str]) -> str:
    return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def _what_is_read(read: List[str], left: List[str]) -> str:
    """What a loader reads (`read`: a file, or an index and its shards), said of the
    earlier run's files among them (`left`)."""
    entry, shards = read[0], read[1:]
    if not shards:
        return f"the earlier {entry}"
    earlier = [s for s in shards if s in left]
    whose = "the earlier" if entry in left else "this merge's"
    if len(earlier) == len(shards):
        return f"{whose} {entry} and the {len(shards)} earlier shard(s) it names"
    return f"{whose} {entry}, with {len(earlier)} earlier shard(s) of the {len(shards)} it names ({_listed(earlier)})"


def warn_of_leftovers(folder, before: Dict[str, Stamp]) -> None:
    """After a merge into `folder`: the weight files it held before (`before`, from
    `weight_files`) that are still there as they were, i.e. that the merge did not write;
    a warning where a loader reads one of them (see the module docstring)."""
    if not before:
        return
    after = weight_files(folder)
    # the indexes first: they say what the shards are
    left = sorted((name for name, stamp in before.items() if after.get(name) == stamp),
                  key=lambda name: (not name.endswith(".index.json"), name))
    if not left:
        return
    stale = {loader: read for loader, names in LOADERS
             if (read := _read_by(folder, names)) and set(read) & set(left)}
    if stale:
        readers = "; ".join(f"{loader} reads {_what_is_read(read, left)}" for loader, read in stale.items())
        LOG.warning(
            "MetaGPT: the output folder %s still holds weight files of an earlier run that this merge "
            "did not write (%s), and a loader reads them instead of this merge's weights (%s); delete "
            "them (mergekit writes beside what a folder holds and removes nothing), or merge into an "
            "empty folder", folder, _listed(left), readers)
    else:
        LOG.info("MetaGPT: the output folder %s still holds weight files of an earlier run that this "
                 "merge did not write and no loader reads (%s); they can be deleted", folder, _listed(left))
