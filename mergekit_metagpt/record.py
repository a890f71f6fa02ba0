"""The merge's record (``metagpt_coefficients.json``); the model card's section is ``card``.

One shape, written by a merge and printed by ``mergekit-metagpt coefficients --json``::

    {"format": 2, "merge_method": ..., "paper": ..., "plugin_version": ...,
     "plugin_code_sha256": ... (``code_digest``: 12 hex digits, null where unknown), "dtype": ...,
     "out_dtype": ... (null unless the recipe sets it), "norms": "...",
     "merges": [ one entry per model set (per set of models merged) ],
     "passed_through": [ {base_model, tensors} per base whose tensors a slice of the base
                         alone passes through, unmerged ]}

Each entry: ``base_model``, ``tensors`` (output tensors the set merges), ``granularity``,
``lambda`` (the overall scale), ``alpha`` (the tempering exponent of the λ; 1 unless the
recipe sets it), ``lambda_from`` and ``density`` (variants), ``int8_mask`` (``metagpt_ties``,
``metagpt_dare_ties``) and ``rescale`` (``metagpt_dare``, ``metagpt_dare_ties``) as the merge took them, and
``models``: ``[{model, squared_norm, lambda}]`` (with ``lambda_per_tensor``:
``{tensors, min, median, max}`` over the tensors with ``granularity: per_tensor``), and ``cosine_similarity``:
``{models, matrix, note, verdict}`` of the task vectors (matrix entries null where not
computed; ``note`` says why). A merge removes an earlier run's record when its pre-pass
ends and writes its own once mergekit has written the model (the ``FinalizeModel``
wrapper; where that wrapper cannot attach, when the pre-pass ends).
"""

from __future__ import annotations

import logging
import os
import statistics
from typing import Any, Dict, List, Optional, Tuple

from mergekit_metagpt.atomic_files import write_json
from mergekit_metagpt.merge_plan import task_parameter
from mergekit_metagpt import PAPER_URL

LOG = logging.getLogger("mergekit_metagpt")
RECORD_NAME = "metagpt_coefficients.json"
RECORD_FORMAT = 2
#: How the record's "norms" begins where some set's λ come from sparsified task vectors.
SPARSE_NORMS = "of the sparsified task vectors (lambda_from: sparse)"


def sparse_norms(payload: Dict[str, Any]) -> bool:
    """Whether a record (`record_payload`) has λ of sparsified task vectors."""
    return payload["norms"].startswith(SPARSE_NORMS)
VARIANT_FLAGS = ("int8_mask", "rescale")


def _uniform(values: List[Any]):
    """One value if all agree, else the distinct values, sorted; floats that agree to 12
    significant digits count as one (a gradient's interpolation gives 0.5666666666666665
    and ...667 for one value), given as the first of them."""
    first = {}
    for value in values:
        key = (type(value), float(f"{value:.12g}")) if isinstance(value, float) else (type(value), repr(value))
        first.setdefault(key, value)
    distinct = list(first.values())
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct)
    distinct.sort(key=(lambda v: v) if numbers else repr)
    return distinct[0] if len(distinct) == 1 else distinct


def set_parameters(set_norms) -> Dict[str, Any]:
    """The set's method parameters as its planned tasks take them (shared by the record and
    the ``inspect`` JSON): ``granularity``, ``lambda``, ``alpha``, and where the method takes
    them ``lambda_from``, ``density`` per model, ``int8_mask`` and ``rescale``."""
    merge_set = set_norms.merge_set
    tasks = merge_set.tasks
    entry: Dict[str, Any] = {
        "granularity": _uniform([task_parameter(t, "granularity", "global") for t in tasks]),
        "lambda": _uniform([float(task_parameter(t, "lambda", 1.0)) for t in tasks]),
        "alpha": set_norms.coefficients.alpha,
    }
    if any(task_parameter(t, "lambda_from") is not None for t in tasks):
        entry["lambda_from"] = _uniform([task_parameter(t, "lambda_from", "dense") for t in tasks])
        entry["density"] = {
            str(m): _uniform([
                float(dict(t.input_parameters[m].items()).get("density", 1.0))
                for t in tasks if m in t.input_parameters
            ])
            for m in merge_set.models
        }
    for name in VARIANT_FLAGS:  # as the method takes them: int8_mask (ties), rescale (dare)
        values = [v for v in (task_parameter(t, name) for t in tasks) if v is not None]
        if values:
            entry[name] = _uniform([bool(v) for v in values])
    return entry


def set_entry(set_norms) -> Dict[str, Any]:
    merge_set = set_norms.merge_set
    tasks = merge_set.tasks
    coefficients = set_norms.coefficients
    entry: Dict[str, Any] = {"base_model": str(merge_set.base), "tensors": len(tasks)}
    entry.update(set_parameters(set_norms))
    models = []
    lambdas = coefficients.lambdas
    # tensors merged with their own λ (granularity: per_tensor, for some or all of the set's tensors)
    by_task = [set_norms.task_lambdas(i) for i, t in enumerate(tasks)
               if task_parameter(t, "granularity", "global") == "per_tensor"]
    for model, norm in coefficients.squared_norms:
        row = {"model": str(model), "squared_norm": norm, "lambda": lambdas[model]}
        if by_task:
            per_tensor = [lams[model] for lams in by_task]
            row["lambda_per_tensor"] = {
                "tensors": len(per_tensor),
                "min": min(per_tensor), "median": statistics.median(per_tensor), "max": max(per_tensor),
            }
        models.append(row)
    entry["models"] = models
    stats = set_norms.stats
    entry["cosine_similarity"] = {"models": [str(m) for m in stats.models], "matrix": stats.cosine,
                                  "note": stats.note, "verdict": stats.verdict()}
    return entry


def run_dtypes(run) -> Tuple[Optional[str], Optional[str]]:
    """The recipe's ``dtype`` and ``out_dtype`` (None where it sets none) of a merge or plan."""
    config = getattr(run, "config", None)
    dtype = getattr(config, "dtype", None)
    out_dtype = getattr(config, "out_dtype", None)
    if config is None and getattr(run, "sets", None):  # planned without run_merge (mergekit-pytorch): the plan's
        first = next(iter(run.sets.values())).tasks[0]
        dtype = getattr(first, "dtype", None) or getattr(first.gather_tensors, "dtype", None)
        out_dtype = getattr(first, "out_dtype", None)
    return dtype, out_dtype


def record_payload(run) -> Dict[str, Any]:
    from mergekit_metagpt import __version__
    from mergekit_metagpt.code_digest import code_digest

    dtype, out_dtype = run_dtypes(run)
    sparse = any(s.sparse for s in run.result.sets)
    return {
        "format": RECORD_FORMAT,
        "merge_method": run.method_name,
        "paper": PAPER_URL,
        "plugin_version": __version__,
        # the installed code (two builds of one version differ here): code_digest
        "plugin_code_sha256": code_digest(),
        "dtype": dtype,
        "out_dtype": out_dtype,
        # mergekit's --random-seed as the merge ran (DARE's masks, and so the λ of
        # lambda_from: sparse, depend on it); None where none was given
        "random_seed": getattr(run.options, "random_seed", None),
        "norms": (SPARSE_NORMS if sparse else "of the dense task vectors")
        + ", over the tensors each model set reads; float32 (float64 for float64 tensors) within a chunk "
          "or block, float64 across them",
        "merges": [set_entry(s) for s in run.result.merging],
        "passed_through": passed_through_entries(run.result),
    }


def per_tensor_count(entry) -> int:
    """How many of a record entry's tensors are merged with their own λ (per_tensor)."""
    rows = entry["models"]
    spread = rows[0].get("lambda_per_tensor") if rows else None
    if spread is None:
        return 0
    return int(spread.get("tensors", entry["tensors"]))  # a record written before the count: all


def per_tensor_of(entry) -> str:
    """" (N of M tensors)" where only some of the set's tensors are per_tensor, else ""."""
    count = per_tensor_count(entry)
    return f" ({count} of {entry['tensors']} tensors)" if 0 < count < entry["tensors"] else ""


def model_row(row, per_tensor: bool) -> List[str]:
    """One model's cells in the λ tables (``coefficients`` and the model card): name,
    ‖δ‖², λ and, with `per_tensor`, the spread of its λ per tensor."""
    cells = [row["model"], f"{row['squared_norm']:.6e}", f"{row['lambda']:.6f}"]
    if per_tensor:
        spread = row["lambda_per_tensor"]
        cells.append(f"{spread['min']:.6f} / {spread['median']:.6f} / {spread['max']:.6f}")
    return cells


def passed_through_entries(result) -> List[Dict[str, Any]]:
    """Per set of the base alone (a slice with only the base): how many tensors it gives."""
    return [{"base_model": str(s.merge_set.base), "tensors": len(s.merge_set.tasks)}
            for s in result.passed_through]


def passed_through_text(entries, ascii: bool = False) -> str:
    """One sentence on the tensors that are a base's own, from the record's
    ``passed_through`` entries (one per base; "" if there are none)."""
    if not entries:
        return ""
    how = (f"alone (where the plan reads only the base: slices or modules with only the base), "
           f"unmerged and without {'lambda' if ascii else 'λ'}")
    if len(entries) == 1:
        count = entries[0]["tensors"]
        return (f"{count} tensor{'s' if count != 1 else ''} of the output "
                f"{'comes' if count == 1 else 'come'} from the base model {entries[0]['base_model']} {how}")
    return (f"{sum(e['tensors'] for e in entries)} tensors of the output come from a base model {how}: "
            + ", ".join(f"{e['tensors']} from {e['base_model']}" for e in entries))


def remove_stale_record(out_path, whose: str = "the earlier run's", stopped: Optional[BaseException] = None) -> None:
    """Remove the record in `out_path`, so that the folder never holds λ that the model in
    it was not merged with: an earlier run's, once a merge of another method is planned (or,
    for a MetaGPT merge, after one that wrote none); a MetaGPT merge's own, after it failed or
    was interrupted once written. Called by the ``run_merge`` wrapper and, for merges of
    another method or planned without it (``mergekit-pytorch``), when the plan's task
    universe is made (``merge_plan.register_universe``). `stopped`: the error that stopped
    a merge after its pre-pass, said as a warning, record or not (the folder may hold part
    of its weights)."""
    if not isinstance(out_path, (str, os.PathLike)):
        return
    path = os.path.join(out_path, RECORD_NAME)
    removed = False
    try:
        os.remove(path)
        removed = True
    except FileNotFoundError:
        pass
    except OSError as error:
        if os.path.lexists(path):  # not: none there, in a folder that takes no change (EROFS)
            LOG.warning("MetaGPT: could not remove %s %s: %s", whose, path, error)
    if stopped is not None:
        again = ("run the same command again (the norms are cached)" if isinstance(stopped, KeyboardInterrupt)
                 else "run it again once the error below is mended (the norms are cached)")
        LOG.warning("MetaGPT: the merge stopped after its pre-pass%s; %s may hold part of this merge's "
                    "weights, not a usable model: %s", f" (removed {whose} {path})" if removed else "",
                    out_path, again)
    elif removed:
        LOG.info("MetaGPT: removed %s %s", whose, path)


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
    run.record_written = True
    return path
