"""On-disk cache of per-tensor squared norms for (base checkpoint, model checkpoint) pairs.

Location: ``$MERGEKIT_METAGPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/mergekit-metagpt/norms``
(``~/.cache/...``). ``MERGEKIT_METAGPT_CACHE=0`` turns it off. Entries are keyed by both
checkpoints' content fingerprints (file names, sizes, mtimes, safetensors headers and
sampled bytes), so a changed checkpoint cannot hit a stale entry. Writes go to a
temporary file that is renamed into place, so an interrupted merge never leaves a
half-written entry; a corrupt or unwritable cache only warns and falls back to computing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Dict, Optional

LOG = logging.getLogger("mergekit_metagpt")
FORMAT = 1


def enabled() -> bool:
    return os.environ.get("MERGEKIT_METAGPT_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> str:
    explicit = os.environ.get("MERGEKIT_METAGPT_CACHE_DIR")
    if explicit:
        return explicit
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "mergekit-metagpt", "norms")


def entry_path(base_fingerprint: str, model_fingerprint: str) -> str:
    key = hashlib.sha256(f"v{FORMAT}|{base_fingerprint}|{model_fingerprint}".encode()).hexdigest()
    return os.path.join(cache_dir(), f"{key}.json")


def load(base_fingerprint: str, model_fingerprint: str) -> Optional[Dict[str, float]]:
    if not enabled():
        return None
    path = entry_path(base_fingerprint, model_fingerprint)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        LOG.warning("MetaGPT: ignoring unreadable norm cache entry %s (%s); recomputing", path, error)
        return None
    norms = data.get("per_tensor") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT
        or data.get("base") != base_fingerprint
        or data.get("model") != model_fingerprint
        or not isinstance(norms, dict)
        or not all(isinstance(v, (int, float)) for v in norms.values())
    ):
        LOG.warning("MetaGPT: ignoring corrupt norm cache entry %s; recomputing", path)
        return None
    return {str(k): float(v) for k, v in norms.items()}


def store(base_fingerprint: str, model_fingerprint: str, per_tensor: Dict[str, float], labels=("", "")) -> None:
    if not enabled():
        return
    path = entry_path(base_fingerprint, model_fingerprint)
    payload = {
        "format": FORMAT,
        "base": base_fingerprint,
        "model": model_fingerprint,
        "base_model": str(labels[0]),
        "model_name": str(labels[1]),
        "per_tensor": per_tensor,
    }
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as error:
        LOG.warning("MetaGPT: could not write the norm cache at %s (%s); continuing without it", path, error)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
