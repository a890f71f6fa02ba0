"""The MetaGPT section of the model card mergekit writes: the record's λ tables, the
cosine matrix and verdict, and links to ``inspect``'s pictures of the same numbers."""

from __future__ import annotations

import logging
import os
from typing import List

from mergekit_metagpt import PAPER_URL
from mergekit_metagpt.coefficients import formula, scale_note
from mergekit_metagpt.markdown import line, table
from mergekit_metagpt.record import (
    model_row, passed_through_text, per_tensor_count, per_tensor_of, record_payload, sparse_norms,
)

LOG = logging.getLogger("mergekit_metagpt")
CARD_MARK = "## MetaGPT coefficients"


def card_section(run) -> str:
    payload = record_payload(run)
    sparse = sparse_norms(payload)
    lines = [
        "",
        CARD_MARK,
        "",
        f"{formula(e['alpha'] for e in payload['merges'])}, with δ_t = θ_t − θ₀; norms over every tensor that each set of "
        f"models merges ([MetaGPT]({PAPER_URL}))"
        + ("; the norms are of the sparsified task vectors (`lambda_from: sparse`)" + _draw(payload) if sparse else "")
        + ":",
    ]
    merges = payload["merges"]
    for number, entry in enumerate(merges, 1):
        per_tensor = per_tensor_count(entry)
        lines.append("")
        if len(merges) > 1:
            lines += [f"### Model set {number} of {len(merges)}: base {line(entry['base_model'])}, "
                      f"{entry['tensors']} tensors", ""]
        header = ["model", "‖δ‖²", "λ"]
        if per_tensor:
            header = ["model", "‖δ‖²", "λ (whole set)", f"λ per tensor{per_tensor_of(entry)}: min / median / max"]
        lines += table(header, [model_row(row, bool(per_tensor)) for row in entry["models"]])
        scaled = scale_note(entry.get("lambda", 1.0))
        if scaled:
            lines += ["", scaled + "."]
        lines += _card_cosines(entry, run.out_path)
    if payload["passed_through"]:
        lines += ["", passed_through_text(payload["passed_through"]) + "."]
    return "\n".join(lines) + "\n"


def _draw(payload) -> str:
    """For DARE's random masks: the seed that draws them again (the record's)."""
    from mergekit_metagpt.inspect_report import one_draw
    from mergekit_metagpt.method import RANDOM_DROP

    if payload["merge_method"] not in RANDOM_DROP:
        return ""
    return "; " + one_draw(payload["random_seed"], "these λ", code="`")


def _card_cosines(entry, out_path) -> List[str]:
    """The cosine matrix as a table, the verdict, and links to ``inspect``'s pictures
    where the folder holds pictures of these very numbers."""
    from mergekit_metagpt.similarity import cosine_text, short_names

    cos = entry["cosine_similarity"]
    if len(cos["models"]) < 2:
        return []
    names = short_names(cos["models"])
    off_diagonal = [v for a, row in enumerate(cos["matrix"]) for b, v in enumerate(row) if a != b]
    if all(v is None for v in off_diagonal):  # none computed: the verdict says why, no table of dashes
        lines = ["", line(cos["verdict"])]
    else:
        lines = ["", "Cosine similarity of the task vectors (MetaGPT's λ assume ~0 off the diagonal):", ""]
        lines += table(["", *names], [[name, *(cosine_text(v) for v in row)] for name, row in zip(names, cos["matrix"])])
        lines += ["", line(cos["verdict"])]
    pictures = inspect_pictures(out_path, entry)
    if pictures:
        lines += ["", "Pictures (`mergekit-metagpt inspect`): "
                  + ", ".join(f"[{title}]({name})" for name, title in pictures)]
    return lines


def _close(got, wanted) -> bool:
    """Two lists of numbers equal to 1e-6 relative (as read back from JSON)."""
    return len(got) == len(wanted) and all(
        abs(a - b) <= 1e-6 * max(abs(b), 1e-30) for a, b in zip(got, wanted))


def _numbers(value) -> list:
    """`value` if it is a list of numbers, else [] (matches nothing)."""
    if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                       for v in value):
        return value
    return []


def inspect_pictures(out_path, entry) -> List[tuple]:
    """(file, title) of the pictures ``inspect`` wrote into `out_path` for this model set
    (same models, norms and λ), else []."""
    import json

    from mergekit_metagpt.inspect_report import JSON_NAME, PICTURES

    if not out_path:
        return []
    try:
        with open(os.path.join(out_path, JSON_NAME), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return []
    merges = data.get("merges") if isinstance(data, dict) else None
    if not isinstance(merges, list):  # not inspect's file: no pictures of ours
        return []
    norms = [row["squared_norm"] for row in entry["models"]]
    lambdas = [row["lambda"] for row in entry["models"]]
    for number, stats in enumerate(merges, 1):
        # the same models, norms and λ (an inspect run with another alpha drew other λ)
        if isinstance(stats, dict) and stats.get("models") == [row["model"] for row in entry["models"]] and _close(
            _numbers(stats.get("squared_norms")), norms
        ) and _close(_numbers(stats.get("lambdas")), lambdas):
            found = []
            for stem, title in PICTURES:
                name = f"{stem}-{number}.png" if len(merges) > 1 else f"{stem}.png"
                if os.path.exists(os.path.join(out_path, name)):
                    found.append((name, title))
            return found
    return []


def add_card_sections(context) -> None:
    """After run_merge: append each run's tables to the card mergekit just wrote."""
    card = os.path.join(context.out_path, "README.md")
    runs = [r for r in context.runs if r.result is not None and r.record_written]  # λ the weights were merged with
    if not runs or not getattr(context.options, "write_model_card", True) or not os.path.exists(card):
        return
    size = None
    try:  # mergekit has just written the card afresh (its recipe block may hold our heading's words)
        size = os.path.getsize(card)
        with open(card, "a", encoding="utf-8") as f:
            for run in runs:
                f.write(card_section(run))
    except OSError as error:
        if size is not None:  # not half a section (a full disk): the card as mergekit wrote it
            try:
                os.truncate(card, size)
            except OSError:
                pass
        LOG.warning("MetaGPT: could not add the coefficients to %s: %s", card, error)
