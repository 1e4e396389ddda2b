"""The one markdown-table renderer and CSV writer of das-lab's reports, so every table looks and parses alike."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

EMPTY_CELL = "-"


def _cell(value: Any) -> str:
    return EMPTY_CELL if value is None else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Optional[str] = None) -> str:
    """A GitHub-style markdown table with padded columns, readable as plain text too.

    Cells are shown with ``str`` (None as ``-``); ``align`` holds one letter per column, ``l`` or
    ``r`` (right-aligned, e.g. numbers); by default every column is left-aligned.
    """
    align = align or "l" * len(header)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align={align!r}: expected one letter, l or r, for each of the {len(header)} columns")
    lines = [[_cell(c) for c in line] for line in [header, *rows]]
    widths = [max(len(c) for c in column) for column in zip(*lines)]
    text = [
        "| " + " | ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(line, widths, align)) + " |"
        for line in lines
    ]
    text.insert(1, "|" + "|".join("-" * (w + 1) + (":" if a == "r" else "-") for w, a in zip(widths, align)) + "|")
    return "\n".join(text)


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
    """Write ``header`` and ``rows`` (any iterable: rows may be produced while writing); returns the row count.

    None becomes an empty cell, so that spreadsheets and ``csv`` readers see a missing value.
    """
    count = 0
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if value is None else value for value in row])
            count += 1
    return count


def measured(row: Sequence[Any]) -> list[Any]:
    """Cells of a row of measurements: floats with three significant digits (one decimal from 10 up)."""
    return [(f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}") if isinstance(v, float) else v for v in row]
