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
