"""Markdown tables for the model card and ``inspect``'s report, whose cells hold model
names as the recipe spells them (a local folder may hold a ``|``)."""

from __future__ import annotations

from typing import Iterable, List


def line(text) -> str:
    """`text` as one line of Markdown: line breaks as spaces (one in a folder's name started a
    line of its own in a heading or paragraph: a heading of its own), control characters as
    escapes (`errors.printable`)."""
    from mergekit_metagpt.errors import printable

    return printable(" ".join(str(text).splitlines()))


def cell(text) -> str:
    """`text` as one table cell: a `line`, ``|`` escaped (else it splits the cell, and the
    row's numbers land under the wrong columns)."""
    return line(str(text).replace("|", "\\|"))


def table(header: Iterable, rows: Iterable[Iterable]) -> List[str]:
    header = [cell(c) for c in header]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cell(c) for c in row) + " |" for row in rows
    ]
