"""A tqdm progress bar for the pre-pass: tensors done and GB read."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading

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


class _LineAboveBars(logging.Handler):
    """Stands in for a console handler while the pre-pass runs inside mergekit's
    "Executing graph" bar: each record on a line of its own. On a terminal the bars are
    cleared, the line written and the bars drawn again under it (``tqdm.write``); in a
    file or pipe, where a bar leaves its line open, that line is ended first (a record
    was glued to the bar: ``Executing graph: 0%|…|INFO:mergekit_metagpt:…``)."""

    def __init__(self, original: logging.StreamHandler):
        super().__init__(original.level)
        self.original = original
        self.setFormatter(original.formatter)
        for each in original.filters:
            self.addFilter(each)

    def emit(self, record):
        try:
            message = self.format(record)
            stream = self.original.stream
            with tqdm.tqdm.external_write_mode(file=stream):
                open_line = any(  # a bar drawn on this stream (tqdm wraps its file)
                    not getattr(bar, "disable", True)
                    and getattr(getattr(bar, "fp", None), "_wrapped", getattr(bar, "fp", None)) is stream
                    for bar in list(getattr(tqdm.tqdm, "_instances", ())))
                terminal = getattr(stream, "isatty", lambda: False)()
                stream.write(("\n" if open_line and not terminal else "") + message + "\n")
                stream.flush()
        except Exception:  # as logging does: never raise from a log call
            self.handleError(record)


_SWAP_LOCK = threading.Lock()


@contextlib.contextmanager
def logs_above_bars():
    """While it runs, the root logger's console handlers (``logging.basicConfig``, as
    mergekit's scripts set up) write each record on a line of its own (`_LineAboveBars`);
    other handlers (files, pytest's capture) are left as they are."""
    root = logging.getLogger()
    with _SWAP_LOCK:
        swapped = {
            id(h): _LineAboveBars(h) for h in root.handlers
            if type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.stdout)
        }
        if swapped:
            root.handlers = [swapped.get(id(h), h) for h in root.handlers]
    try:
        yield
    finally:
        if swapped:
            back = {id(h): h.original for h in swapped.values()}
            with _SWAP_LOCK:
                root.handlers = [back.get(id(h), h) for h in root.handlers]
