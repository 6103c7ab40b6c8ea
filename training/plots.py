"""PNG plots for what people would rather look at than read. Matplotlib's Agg backend only."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: training runs on servers without a display

import matplotlib.pyplot as plt
from torch import Tensor


def _save(figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def lr_find_curve(
    lrs: Sequence[float], losses: Sequence[float], suggestions: Mapping[str, float], path: Path
) -> Path:
    figure, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    for (name, lr), colour in zip(suggestions.items(), ("red", "green"), strict=False):
        ax.axvline(lr, color=colour, linestyle="--", label=f"{name}: {lr:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    ax.legend()
    return _save(figure, path)


def confusion_matrix(confusion: Tensor, labels: Sequence[str], path: Path) -> Path:
    n = len(labels)
    side = max(4.0, 0.35 * n + 2)
    figure, ax = plt.subplots(figsize=(side, side))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=90)
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    if n <= 40:
        peak = int(confusion.max()) or 1
        for (row, col), count in zip(
            ((r, c) for r in range(n) for c in range(n)), confusion.flatten().tolist(), strict=True
        ):
            colour = "white" if count > peak / 2 else "black"
            ax.text(col, row, str(count), ha="center", va="center", color=colour, fontsize=7)
    return _save(figure, path)


def threshold_sweep(sweep: Sequence[tuple[float, float]], best: float, path: Path) -> Path:
    figure, ax = plt.subplots(figsize=(6, 4))
    ax.plot([t for t, _ in sweep], [a for _, a in sweep], marker="o")
    ax.axvline(best, color="red", linestyle="--", label=f"chosen: {best:.2f}")
    ax.set_xlabel("threshold")
    ax.set_ylabel("accuracy_multi")
    ax.legend()
    return _save(figure, path)


def _grid(count: int) -> tuple[Any, list[Any]]:
    columns = min(4, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat:
        ax.axis("off")
    return figure, flat[:count]


def image_grid(images: Tensor, titles: Sequence[str], path: Path) -> Path:
    """uint8 NHWC images, each with a title."""
    figure, axes = _grid(len(images))
    for ax, image, title in zip(axes, images, titles, strict=True):
        ax.imshow(image.numpy())
        ax.set_title(title, fontsize=7)
    return _save(figure, path)


def points_grid(images: Tensor, actual: Tensor, predicted: Tensor | None, path: Path) -> Path:
    """True points in green and predicted ones (if any) in red; [N, K, 2] in [-1, 1]."""
    figure, axes = _grid(len(images))
    shown = [actual] if predicted is None else [actual, predicted]
    for ax, image, *point_sets in zip(axes, images, *shown, strict=True):
        height, width = image.shape[:2]
        ax.imshow(image.numpy())
        for points, colour in zip(point_sets, ("lime", "red"), strict=False):
            x = (points[:, 0].float() + 1) / 2 * width
            y = (points[:, 1].float() + 1) / 2 * height
            ax.scatter(x.numpy(), y.numpy(), c=colour, s=30, marker="x")
    return _save(figure, path)
