"""Plain-text rendering of results for the terminal."""

from __future__ import annotations

from collections.abc import Sequence

from .results import Prediction


def summarize(result: Prediction) -> str:
    """One line for one image's result, without the provenance ``str()`` adds."""
    return result.summary()


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)
