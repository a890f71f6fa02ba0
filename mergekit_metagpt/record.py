"""The merge's own record: ``metagpt_coefficients.json`` in the output directory."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
from typing import NamedTuple, Optional

LOG = logging.getLogger("mergekit_metagpt")
RECORD_NAME = "metagpt_coefficients.json"


class RunningMerge(NamedTuple):
    out_path: str
    config: object
    options: object
    key: tuple


def running_merge() -> Optional[RunningMerge]:
    """The ``run_merge`` call in progress (out_path, config, options), if any.

    mergekit does not hand the output path to merge methods; ``run_merge`` sits on the
    main thread's stack while the executor runs (on every executor, the multi-GPU one
    included), so its arguments are read from there.
    """
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "run_merge" and frame.f_globals.get("__name__") == "mergekit.merge":
            out_path = frame.f_locals.get("out_path")
            if isinstance(out_path, str):
                config = frame.f_locals.get("merge_config")
                executor = frame.f_locals.get("exec")
                return RunningMerge(
                    out_path, config, frame.f_locals.get("options"),
                    (out_path, id(config), id(executor)),
                )
        frame = frame.f_back
    return None


def record_payload(method: str, base, coefficients, dtype: Optional[str] = None) -> dict:
    from mergekit_metagpt import __version__

    lambdas = coefficients.lambdas
    return {
        "merge_method": method,
        "paper": "https://arxiv.org/abs/2406.11385",
        "base_model": str(base),
        "models": [
            {"model": str(model), "squared_norm": norm, "lambda": lambdas[model]}
            for model, norm in coefficients.squared_norms
        ],
        "dtype": dtype,
        "norms_accumulated_in": "float32 per tensor, float64 overall",
        "plugin_version": __version__,
    }


def write_record(method: str, base, coefficients, running) -> Optional[str]:
    if running is None:
        return None
    out_path, config = running.out_path, running.config
    payload = record_payload(method, base, coefficients, getattr(config, "dtype", None))
    path = os.path.join(out_path, RECORD_NAME)
    try:
        os.makedirs(out_path, exist_ok=True)
        existing = []
        if os.path.exists(path):  # several slices with other bases: keep each
            with open(path, encoding="utf-8") as f:
                previous = json.load(f)
            existing = previous if isinstance(previous, list) else [previous]
        data = payload if not existing else existing + [payload]
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=out_path)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except (OSError, ValueError) as error:
        LOG.warning("MetaGPT: could not write %s: %s", path, error)
        return None
    return path


# -- the λ table in the model card ------------------------------------------------
# mergekit writes README.md (the model card) after the last merge task, so no code of
# the method runs after it. The table is appended when the process exits (the
# mergekit-yaml case), and only to a card that mergekit wrote for this merge: newer
# than the pre-pass and naming the method.
CARD_MARK = "## MetaGPT coefficients"
_PENDING = {}
_PENDING_LOCK = threading.Lock()


def card_section(coefficients) -> str:
    lambdas = coefficients.lambdas
    lines = [
        "",
        CARD_MARK,
        "",
        "λ_t = ‖θ_t − θ₀‖² / Σ_k ‖θ_k − θ₀‖², norms over every tensor "
        "([MetaGPT](https://arxiv.org/abs/2406.11385)):",
        "",
        "| model | ‖δ‖² | λ |",
        "|---|---|---|",
    ]
    lines += [f"| {model} | {norm:.6e} | {lambdas[model]:.6f} |" for model, norm in coefficients.squared_norms]
    return "\n".join(lines) + "\n"


def schedule_card_update(out_path: str, pretty_name: str, coefficients) -> None:
    import atexit
    import time

    with _PENDING_LOCK:
        if not _PENDING:
            atexit.register(update_cards)
        _PENDING[out_path] = (pretty_name, coefficients, time.time())


def update_cards() -> None:
    with _PENDING_LOCK:
        pending = dict(_PENDING)
        _PENDING.clear()
    for out_path, (pretty_name, coefficients, since) in pending.items():
        card = os.path.join(out_path, "README.md")
        try:
            if not os.path.exists(card) or os.path.getmtime(card) < since:
                continue
            with open(card, encoding="utf-8") as f:
                text = f.read()
            if f"[{pretty_name}]" not in text or CARD_MARK in text:
                continue
            with open(card, "a", encoding="utf-8") as f:
                f.write(card_section(coefficients))
        except OSError as error:
            LOG.warning("MetaGPT: could not add the coefficients to %s: %s", card, error)
