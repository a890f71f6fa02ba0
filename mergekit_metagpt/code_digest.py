"""A digest of this plugin's code as installed: it tells apart two builds of one version.

pip does not replace an installed wheel by another of the same version (it says "already
installed"), so ``--version`` and the record name the code itself as well as the version.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from typing import List, Optional

PACKAGES = ("mergekit_metagpt", "mergekit_metagpt_hook")


def _folder(package: str) -> Optional[str]:
    """The package's folder, without importing it (None where it is not found)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return locations[0] if locations else None


def _sources(folder: str) -> List[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".py"))


@functools.lru_cache(maxsize=None)
def code_digest() -> str:
    """The first 12 hex digits of a SHA-256 over the ``.py`` files of the plugin and of its
    start-up hook (each file's package, name and bytes, in name order), as this Python
    imports them; "unknown" where a file cannot be read."""
    digest = hashlib.sha256()
    try:
        for package in PACKAGES:
            folder = _folder(package)
            if folder is None:
                return "unknown"
            for name in _sources(folder):
                with open(os.path.join(folder, name), "rb") as f:
                    content = f.read()
                digest.update(f"{package}/{name}\0{len(content)}\0".encode())
                digest.update(content)
    except OSError:
        return "unknown"
    return digest.hexdigest()[:12]
