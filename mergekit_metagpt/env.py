"""On/off environment switches: the plugin's (MERGEKIT_METAGPT_CACHE, _COSINES, _PROGRESS,
_DEBUG) and the hub's HF_HUB_OFFLINE."""

from __future__ import annotations

import os

#: Keeps a refusal's traceback (the CLI's and mergekit's commands print one line otherwise).
DEBUG_SWITCH = "MERGEKIT_METAGPT_DEBUG"

OFF = ("0", "false", "no", "off")
ON = ("1", "true", "yes", "on")


def switched_off(name: str) -> bool:
    """True when the environment variable `name` says 0, false, no or off (any case)."""
    return os.environ.get(name, "").strip().lower() in OFF


def switched_on(name: str) -> bool:
    """True when the environment variable `name` says 1, true, yes or on (any case)."""
    return os.environ.get(name, "").strip().lower() in ON
