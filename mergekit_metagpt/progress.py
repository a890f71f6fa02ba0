"""A tqdm progress bar for the pre-pass: tensors done and GB read."""

from __future__ import annotations

import tqdm

from mergekit_metagpt.env import switched_off


def progress_enabled(quiet: bool = False) -> bool:
    """Off with mergekit's quiet option as the merge sees it (``--quiet``,
    ``MergeOptions(quiet=True)``, handed in as `quiet`) or ``MERGEKIT_METAGPT_PROGRESS=0``."""
    if switched_off("MERGEKIT_METAGPT_PROGRESS"):
        return False
    return not quiet


class _Bar:
    def __init__(self, total: int, desc: str, quiet: bool = False):
        self._gb = 0.0
        self._bar = tqdm.tqdm(
            total=total, desc=desc, unit="tensor", disable=not progress_enabled(quiet)
        )

    def update(self, tensors: int, nbytes: int = 0) -> None:
        self._gb += nbytes / 1e9
        self._bar.set_postfix_str(f"{self._gb:.2f} GB read", refresh=False)
        self._bar.update(tensors)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._bar.close()
        return False


def progress_bar(total: int, desc: str, quiet: bool = False) -> _Bar:
    return _Bar(total, desc, quiet)
