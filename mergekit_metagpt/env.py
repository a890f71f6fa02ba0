"""The plugin's on/off environment switches (MERGEKIT_METAGPT_CACHE, _COSINES, _PROGRESS)."""

from __future__ import annotations

import os

OFF = ("0", "false", "no", "off")


def switched_off(name: str) -> bool:
    """True when the environment variable `name` says 0, false, no or off (any case)."""
    return os.environ.get(name, "").strip().lower() in OFF
