"""Plain-text rendering of results for the terminal."""

from __future__ import annotations

from collections.abc import Sequence

from .results import Classification, ImageError, MultiLabel, Points, Prediction


def summarize(result: Prediction) -> str:
    """One line for one image's result, without the provenance ``str()`` adds."""
    if isinstance(result, Classification):
        ranked = ", ".join(str(entry) for entry in result.top)
        if result.below_min_confidence:
            return f"(none: best {ranked} < {result.min_confidence:.2f})"
        return ranked
    if isinstance(result, MultiLabel):
        found = ", ".join(str(entry) for entry in result.labels) or "(no labels)"
        if result.all_scores:
            every = ", ".join(str(entry) for entry in result.all_scores)
            return f"{found}  | all: {every}"
        return found
    if isinstance(result, Points):
        return ", ".join(str(point) for point in result.points)
    if isinstance(result, ImageError):
        return f"ERROR {result.code}: {result.message}"
    raise TypeError(f"not a prediction: {type(result).__name__}")


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)
