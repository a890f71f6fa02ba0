"""The merge's record (``metagpt_coefficients.json``) and the λ tables in the model card.

One shape, written by a merge and printed by ``mergekit-metagpt coefficients --json``::

    {"format": 2, "merge_method": ..., "paper": ..., "plugin_version": ..., "dtype": ...,
     "norms": "...", "merges": [ one entry per merge set (per set of models merged) ]}

Each entry: ``base_model``, ``tensors`` (output tensors the set merges), ``granularity``,
``lambda`` (the overall scale), ``lambda_from`` and ``density`` (variants), and
``models``: ``[{model, squared_norm, lambda}]`` (with ``lambda_per_tensor``:
``{min, median, max}`` for ``granularity: per_tensor``). A merge writes the file once,
when its pre-pass ends, replacing the record of any earlier run in that folder.
"""

from __future__ import annotations

import logging
import os
import statistics
from typing import Any, Dict, List, Optional

from mergekit_metagpt.atomic_json import write_json
from mergekit_metagpt import PAPER_URL

LOG = logging.getLogger("mergekit_metagpt")
RECORD_NAME = "metagpt_coefficients.json"
RECORD_FORMAT = 2


def _uniform(values: List[Any]):
    """One value if all agree, else the sorted distinct values."""
    distinct = sorted(set(values), key=repr)
    return distinct[0] if len(distinct) == 1 else distinct


def _param(task, name, default=None):
    return dict(task.parameters.items()).get(name, default)


def set_entry(set_norms) -> Dict[str, Any]:
    merge_set = set_norms.merge_set
    tasks = merge_set.tasks
    coefficients = set_norms.coefficients
    granularity = _uniform([_param(t, "granularity", "global") for t in tasks])
    entry: Dict[str, Any] = {
        "base_model": str(merge_set.base),
        "tensors": len(tasks),
        "granularity": granularity,
        "lambda": _uniform([float(_param(t, "lambda", 1.0)) for t in tasks]),
    }
    if any("lambda_from" in dict(t.parameters.items()) for t in tasks):
        entry["lambda_from"] = _uniform([_param(t, "lambda_from", "dense") for t in tasks])
        entry["density"] = {
            str(m): _uniform([
                float(dict(t.input_parameters[m].items()).get("density", 1.0))
                for t in tasks if m in t.input_parameters
            ])
            for m in merge_set.models
        }
    models = []
    lambdas = coefficients.lambdas
    by_task = [set_norms.task_lambdas(i) for i in range(len(tasks))] if granularity == "per_tensor" else []
    for model, norm in coefficients.squared_norms:
        row = {"model": str(model), "squared_norm": norm, "lambda": lambdas[model]}
        if by_task:
            per_tensor = [lams[model] for lams in by_task]
            row["lambda_per_tensor"] = {
                "min": min(per_tensor), "median": statistics.median(per_tensor), "max": max(per_tensor),
            }
        models.append(row)
    entry["models"] = models
    return entry


def record_payload(run) -> Dict[str, Any]:
    from mergekit_metagpt import __version__

    config = run.config
    dtype = getattr(config, "dtype", None)
    if dtype is None and run.sets:
        first = next(iter(run.sets.values())).tasks[0]
        dtype = getattr(first, "dtype", None) or getattr(first.gather_tensors, "dtype", None)
    sparse = any(s.sparse for s in run.result.sets)
    return {
        "format": RECORD_FORMAT,
        "merge_method": run.method_name,
        "paper": PAPER_URL,
        "plugin_version": __version__,
        "dtype": dtype,
        "norms": (
            "of the sparsified task vectors (lambda_from: sparse)" if sparse
            else "of the dense task vectors"
        ) + ", over the tensors each merge set reads; float32 per tensor, float64 overall",
        "merges": [set_entry(s) for s in run.result.sets],
    }


def remove_stale_record(out_path) -> None:
    """Before a merge into `out_path`: remove an earlier run's record, so that the folder
    never holds λ that the model in it was not merged with (the merge writes its own)."""
    if not isinstance(out_path, (str, os.PathLike)):
        return
    path = os.path.join(out_path, RECORD_NAME)
    try:
        os.remove(path)
    except FileNotFoundError:
        return
    except OSError as error:
        LOG.warning("MetaGPT: could not remove the earlier record %s: %s", path, error)
        return
    LOG.info("MetaGPT: removed the earlier run's %s", path)


def write_record(run) -> Optional[str]:
    """Write (replace) the record in the run's output folder, if it has one."""
    if not run.out_path or run.result is None:
        return None
    path = os.path.join(run.out_path, RECORD_NAME)
    try:
        write_json(path, record_payload(run), indent=2)
    except OSError as error:
        LOG.warning("MetaGPT: could not write %s: %s", path, error)
        return None
    return path


# -- the λ tables in the model card -------------------------------------------------
CARD_MARK = "## MetaGPT coefficients"


def card_section(run) -> str:
    payload = record_payload(run)
    sparse = "sparsified" in payload["norms"]
    lines = [
        "",
        CARD_MARK,
        "",
        "λ_t = ‖θ_t − θ₀‖² / Σ_k ‖θ_k − θ₀‖², norms over every tensor that each set of "
        f"models merges ([MetaGPT]({PAPER_URL}))"
        + ("; the norms are of the sparsified task vectors (`lambda_from: sparse`)" if sparse else "")
        + ":",
    ]
    merges = payload["merges"]
    for number, entry in enumerate(merges, 1):
        per_tensor = entry["granularity"] == "per_tensor"
        lines.append("")
        if len(merges) > 1:
            lines += [f"### Model set {number} of {len(merges)}: base {entry['base_model']}, "
                      f"{entry['tensors']} tensors", ""]
        if per_tensor:
            lines += ["| model | ‖δ‖² | λ (whole set) | λ per tensor: min / median / max |", "|---|---|---|---|"]
        else:
            lines += ["| model | ‖δ‖² | λ |", "|---|---|---|"]
        for row in entry["models"]:
            cells = [row["model"], f"{row['squared_norm']:.6e}", f"{row['lambda']:.6f}"]
            if per_tensor:
                spread = row["lambda_per_tensor"]
                cells.append(f"{spread['min']:.6f} / {spread['median']:.6f} / {spread['max']:.6f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_card_sections(context) -> None:
    """After run_merge: append each run's tables to the card mergekit just wrote."""
    card = os.path.join(context.out_path, "README.md")
    runs = [r for r in context.runs if r.result is not None]
    if not runs or not getattr(context.options, "write_model_card", True) or not os.path.exists(card):
        return
    try:
        with open(card, encoding="utf-8") as f:
            text = f.read()
        if CARD_MARK in text:
            return
        with open(card, "a", encoding="utf-8") as f:
            for run in runs:
                f.write(card_section(run))
    except OSError as error:
        LOG.warning("MetaGPT: could not add the coefficients to %s: %s", card, error)
