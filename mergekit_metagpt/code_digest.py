"""A digest of this plugin's code as installed: it tells apart two builds of one version.

pip does not replace an installed wheel by another of the same version (it says "already
installed"), so ``--version`` and the record name the code itself as well as the version.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import importlib.util
from typing import Optional

PACKAGES = ("mergekit_metagpt", "mergekit_metagpt_hook")


def _update(digest, package: str) -> None:
    """Feed ``package``'s ``.py`` files (name and bytes, in name order) to ``digest``; a
    package not found, as such. Through importlib.resources: a folder or a zip archive."""
    if importlib.util.find_spec(package) is None:
        digest.update(f"{package}: not found\0".encode())
        return
    files = sorted((f for f in importlib.resources.files(package).iterdir() if f.name.endswith(".py")),
                   key=lambda f: f.name)
    for file in files:
        content = file.read_bytes()
        name = file.name.encode("utf-8", "surrogateescape")  # any file name the system allows
        digest.update(package.encode() + b"/" + name + f"\0{len(content)}\0".encode())
        digest.update(content)


@functools.lru_cache(maxsize=None)
def code_digest() -> Optional[str]:
    """The first 12 hex digits of a SHA-256 over the ``.py`` files of the plugin and of its
    start-up hook, as found at the first call; None where they cannot be read. Never raises:
    it labels a merge's record and ``--version``, neither of which it may fail."""
    digest = hashlib.sha256()
    try:
        for package in PACKAGES:
            _update(digest, package)
    except Exception:  # noqa: BLE001 - a label, never a reason to fail
        return None
    return digest.hexdigest()[:12]
