"""Per-class reports and top losses, on outputs whose right answers are worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from visionrpc.training.tasks import get_task, top_losses

LABELS = ("cat", "dog", "fox")


def rows(report: str) -> dict[str, list[float]]:
    return {
        line.split()[0]: [float(v) for v in line.split()[-4:]] for line in report.splitlines()[1:]
    }


def test_the_classification_report_counts_precision_recall_and_support_per_class() -> None:
    # Truth cat, cat, dog, fox; predicted cat, dog, dog, dog.
    outputs = torch.tensor([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.2, 0.5, 0.3]])
    targets = torch.tensor([0, 0, 1, 2])
    report = get_task("classification").class_report(outputs, targets, LABELS, 0.5)
    assert report is not None
    table = rows(report)
    assert table["cat"] == pytest.approx([1.0, 0.5, 2 / 3, 2], abs=1e-4)
    assert table["dog"] == pytest.approx([1 / 3, 1.0, 0.5, 1], abs=1e-4)
    assert table["fox"] == pytest.approx([0.0, 0.0, 0.0, 1], abs=1e-4)


def test_the_multilabel_report_decides_at_the_given_threshold() -> None:
    outputs = torch.tensor([[0.9, 0.4, 0.1], [0.6, 0.7, 0.2]])
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    report = get_task("multilabel").class_report(outputs, targets, LABELS, 0.5)
    assert report is not None
    assert rows(report)["dog"] == pytest.approx([1.0, 0.5, 2 / 3, 2], abs=1e-4)
    lower = get_task("multilabel").class_report(outputs, targets, LABELS, 0.3)
    assert lower is not None and rows(lower)["dog"] == pytest.approx([1.0, 1.0, 1.0, 2], abs=1e-4)
    assert get_task("points").class_report(outputs, targets, LABELS, 0.5) is None


def test_top_losses_rank_the_most_confidently_wrong_first() -> None:
    outputs = torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.4, 0.3, 0.3]])
    targets = torch.tensor([0, 0, 0])
    worst = top_losses(get_task("classification"), outputs, targets, 2)
    assert [index for index, _ in worst] == [1, 2]
    assert worst[0][1] == pytest.approx(-math.log(0.05))
