"""Progress of the pre-pass: tensors done and GB read.

On a terminal, a tqdm bar (under mergekit's "Executing graph" bar), removed when the pass
ends and replaced by one summary line. In a file or pipe (``> log``, nohup, a job
scheduler), where a second bar would write a new line and cursor codes at every refresh,
plain lines instead: one every ``LINE_EVERY_S`` seconds and the summary.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import weakref

import tqdm

from mergekit_metagpt.env import switched_off
from mergekit_metagpt.fork_safety import renew_after_fork

#: In a file or pipe, the seconds between two progress lines of one pass.
LINE_EVERY_S = 30.0


def progress_enabled(quiet: bool = False) -> bool:
    """Off with mergekit's quiet option as the merge sees it (``--quiet``,
    ``MergeOptions(quiet=True)``, handed in as `quiet`) or ``MERGEKIT_METAGPT_PROGRESS=0``."""
    if switched_off("MERGEKIT_METAGPT_PROGRESS"):
        return False
    return not quiet


def is_terminal(stream) -> bool:
    """Whether `stream` is a terminal (False for a file, a pipe, or one replaced or closed)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed
        return False


#: stream -> time.time() when a line written here last ended on it (held weakly: a process
#: that gives each run a fresh stream, as a notebook or a service may, keeps none of them)
_LINE_ENDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _line_ended(stream) -> float:
    """When a line written here last ended on `stream` (0: never, or not known)."""
    try:
        return _LINE_ENDED.get(stream, 0.0)
    except TypeError:  # a stream that takes no weak reference: any bar on it counts as open
        return 0.0


def _note_line_ended(stream) -> None:
    """Note that a line written here ended on `stream` now (where it takes a weak reference)."""
    try:
        _LINE_ENDED[stream] = time.time()
    except TypeError:
        pass


def _bar_line_open(stream) -> bool:
    """Whether a tqdm bar (mergekit's) drawn on `stream` since this module last ended a
    line there left its line open, as a bar does in a file or pipe (tqdm wraps the file it
    writes to, and notes when it last drew; its monitor thread may also redraw a bar that
    stalled for `maxinterval` without noting it: the pre-pass stalls mergekit's bar, so
    such a bar counts as open, at worst an empty line)."""
    ended, now = _line_ended(stream), time.time()
    monitored = bool(getattr(tqdm.tqdm, "monitor_interval", 0))
    with tqdm.tqdm.get_lock():  # bars other threads make or close meanwhile
        bars = list(getattr(tqdm.tqdm, "_instances", ()))
    for bar in bars:
        if getattr(bar, "disable", True) or \
                getattr(getattr(bar, "fp", None), "_wrapped", getattr(bar, "fp", None)) is not stream:
            continue
        drawn = getattr(bar, "last_print_t", float("inf"))
        if drawn >= ended or (monitored and now - drawn >= getattr(bar, "maxinterval", 10.0)):
            return True
    return False


def _write_line(stream, text: str) -> None:
    """`text` on a line of its own: on a terminal above the bars (tqdm clears and redraws
    them); in a file or pipe after ending a bar's open line."""
    if is_terminal(stream):
        tqdm.tqdm.write(text, file=stream)
    else:
        stream.write(("\n" if _bar_line_open(stream) else "") + text + "\n")
        stream.flush()
        _note_line_ended(stream)


class _Bar:
    def __init__(self, total: int, desc: str, quiet: bool = False):
        self._gb, self._done, self._total, self._desc = 0.0, 0, total, desc
        self._stream = sys.stderr
        self._enabled = progress_enabled(quiet)
        self._started = self._last_line = time.monotonic()
        self._bar = None
        if self._enabled and is_terminal(self._stream):
            self._bar = tqdm.tqdm(total=total, desc=desc, unit="tensor", leave=False, file=self._stream)

    def update(self, tensors: int, nbytes: int = 0) -> None:
        self._gb += nbytes / 1e9
        self._done += tensors
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self._gb:.2f} GB read", refresh=False)
            self._bar.update(tensors)
        elif self._enabled and time.monotonic() - self._last_line >= LINE_EVERY_S:
            self._last_line = time.monotonic()
            self._say(f"{self._desc}: {self._done}/{self._total} tensors, {self._gb:.2f} GB read, "
                      f"{self._last_line - self._started:.0f} s")

    def _say(self, text: str) -> None:
        try:
            _write_line(self._stream, text)
        except (OSError, ValueError, AttributeError):  # stderr closed or replaced: progress is no reason to fail
            self._enabled = False

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        if self._bar is not None:
            self._bar.close()
        if self._enabled and kind is None:
            self._say(f"{self._desc}: {self._done} tensors, {self._gb:.2f} GB read in "
                      f"{time.monotonic() - self._started:.1f} s")
        return False


def progress_bar(total: int, desc: str, quiet: bool = False) -> _Bar:
    return _Bar(total, desc, quiet)


def say(text: str, quiet: bool = False) -> None:
    """One line on stderr where progress is shown (not quiet), beside the bars as the
    pre-pass's summary is; never an error of its own."""
    if progress_enabled(quiet):
        from mergekit_metagpt.errors import printable

        try:
            _write_line(sys.stderr, printable(text))
        except (OSError, ValueError, AttributeError):  # stderr closed or replaced
            pass


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
            # in a file or pipe, not through tqdm's clear-and-redraw: that wrote a stale copy
            # of mergekit's bar (and a line of blanks) before each record
            _write_line(self.original.stream, self.format(record))
        except Exception:  # as logging does: never raise from a log call
            self.handleError(record)


_SWAP_LOCK = threading.Lock()
renew_after_fork(__name__, "_SWAP_LOCK")


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
