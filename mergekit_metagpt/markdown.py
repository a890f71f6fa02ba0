"""Markdown tables for the model card and ``inspect``'s report, whose cells hold model
names as the recipe spells them (a local folder may hold a ``|``)."""

from __future__ import annotations

from typing import Iterable, List


def cell(text) -> str:
    """`text` as one table cell: ``|`` escaped (else it splits the cell, and the row's
    numbers land under the wrong columns), line breaks as spaces."""
    return " ".join(str(text).replace("|", "\\|").splitlines())


def table(header: Iterable, rows: Iterable[Iterable]) -> List[str]:
    header = [cell(c) for c in header]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cell(c) for c in row) + " |" for row in rows
    ]
