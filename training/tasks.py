"""The three tasks as a registry: each supplies its loss, activation, metrics, decoder and plots.

Outputs passed to metrics and decoders are already activated (probabilities, or points
in [-1, 1]), exactly what the exported ONNX graph returns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from visionrpc.server.preprocess import Geometry

from . import plots

LossFunction = Callable[[Tensor, Tensor], Tensor]
SWEEP_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
POINT_RANGE = (-1.0, 1.0)


@dataclass
class Evaluation:
    """Final validation results; fields a task does not use keep their defaults."""

    metrics: dict[str, float]
    threshold: float = 0.5
    confusion: Tensor | None = None
    most_confused: list[tuple[str, str, int]] = field(default_factory=list)
    sweep: list[tuple[float, float]] = field(default_factory=list)


class Task(ABC):
    name: str
    supports_mixup: bool = False

    @abstractmethod
    def n_outputs(self, n_labels: int) -> int: ...

    @abstractmethod
    def loss_function(self, label_smoothing: float = 0.0) -> LossFunction:
        """Loss on the network's raw outputs."""

    @abstractmethod
    def activation(self, raw: Tensor) -> Tensor: ...

    @abstractmethod
    def epoch_metrics(
        self, outputs: Tensor, targets: Tensor, geometries: Sequence[Geometry]
    ) -> dict[str, float]:
        """The cheap metrics printed after every epoch."""

    @abstractmethod
    def evaluate(
        self,
        outputs: Tensor,
        targets: Tensor,
        geometries: Sequence[Geometry],
        labels: Sequence[str],
    ) -> Evaluation: ...

    @abstractmethod
    def decode(self, outputs: Tensor, labels: Sequence[str], threshold: float) -> list[str]:
        """One readable line per image."""

    def plots(
        self,
        evaluation: Evaluation,
        images: Tensor,
        outputs: Tensor,
        targets: Tensor,
        labels: Sequence[str],
        out_dir: Path,
    ) -> list[Path]:
        """A grid of validation images with their true and predicted answers."""
        count = min(len(images), 16)
        truth = self.decode_targets(targets[:count], labels)
        predicted = self.decode(outputs[:count], labels, evaluation.threshold)
        titles = [f"{t}\n-> {p}" for t, p in zip(truth, predicted, strict=True)]
        path = out_dir / "predictions.png"
        plots.image_grid(images[:count], titles, path)
        return [path]

    @abstractmethod
    def decode_targets(self, targets: Tensor, labels: Sequence[str]) -> list[str]: ...

    @abstractmethod
    def item_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Each image's loss from the activated outputs: what ``top_losses`` ranks."""

    def class_report(
        self, outputs: Tensor, targets: Tensor, labels: Sequence[str], threshold: float
    ) -> str | None:
        """Precision, recall, F1 and support per class; None where the task has no classes."""
        return None


class Classification(Task):
    name = "classification"
    supports_mixup = True

    def n_outputs(self, n_labels: int) -> int:
        return n_labels

    def loss_function(self, label_smoothing: float = 0.0) -> LossFunction:
        def loss(raw: Tensor, targets: Tensor) -> Tensor:
            return F.cross_entropy(raw.float(), targets, label_smoothing=label_smoothing)

        return loss

    def activation(self, raw: Tensor) -> Tensor:
        return torch.softmax(raw, dim=1)

    def epoch_metrics(
        self, outputs: Tensor, targets: Tensor, geometries: Sequence[Geometry]
    ) -> dict[str, float]:
        return {"error_rate": error_rate(outputs, targets)}

    def evaluate(
        self,
        outputs: Tensor,
        targets: Tensor,
        geometries: Sequence[Geometry],
        labels: Sequence[str],
    ) -> Evaluation:
        confusion = confusion_matrix(outputs.argmax(dim=1), targets, len(labels))
        return Evaluation(
            metrics={
                "error_rate": error_rate(outputs, targets),
                "accuracy": accuracy(outputs, targets),
            },
            confusion=confusion,
            most_confused=most_confused(confusion, labels),
        )

    def decode(self, outputs: Tensor, labels: Sequence[str], threshold: float) -> list[str]:
        scores, indices = outputs.max(dim=1)
        return [
            f"{labels[i]} {s:.2f}" for s, i in zip(scores.tolist(), indices.tolist(), strict=True)
        ]

    def decode_targets(self, targets: Tensor, labels: Sequence[str]) -> list[str]:
        return [labels[i] for i in targets.tolist()]

    def item_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        chosen = outputs.gather(1, targets.long().view(-1, 1)).squeeze(1)
        return -torch.log(chosen.clamp_min(1e-12))

    def class_report(
        self, outputs: Tensor, targets: Tensor, labels: Sequence[str], threshold: float
    ) -> str | None:
        classes = torch.arange(len(labels))
        predicted = outputs.argmax(dim=1)[:, None] == classes
        actual = targets.long()[:, None] == classes
        return _report(predicted, actual, labels)

    def plots(
        self,
        evaluation: Evaluation,
        images: Tensor,
        outputs: Tensor,
        targets: Tensor,
        labels: Sequence[str],
        out_dir: Path,
    ) -> list[Path]:
        paths = super().plots(evaluation, images, outputs, targets, labels, out_dir)
        assert evaluation.confusion is not None
        paths.append(out_dir / "confusion_matrix.png")
        plots.confusion_matrix(evaluation.confusion, labels, paths[-1])
        return paths


class MultiLabel(Task):
    name = "multilabel"
    supports_mixup = True

    def n_outputs(self, n_labels: int) -> int:
        return n_labels

    def loss_function(self, label_smoothing: float = 0.0) -> LossFunction:
        def loss(raw: Tensor, targets: Tensor) -> Tensor:
            return F.binary_cross_entropy_with_logits(raw.float(), targets.float())

        return loss

    def activation(self, raw: Tensor) -> Tensor:
        return torch.sigmoid(raw)

    def epoch_metrics(
        self, outputs: Tensor, targets: Tensor, geometries: Sequence[Geometry]
    ) -> dict[str, float]:
        return {"accuracy_multi": accuracy_multi(outputs, targets, 0.5)}

    def evaluate(
        self,
        outputs: Tensor,
        targets: Tensor,
        geometries: Sequence[Geometry],
        labels: Sequence[str],
    ) -> Evaluation:
        sweep = threshold_sweep(outputs, targets)
        # Ties go to the threshold nearest 0.5, the least surprising default.
        best_threshold, best_accuracy = max(sweep, key=lambda ta: (ta[1], -abs(ta[0] - 0.5)))
        return Evaluation(
            metrics={
                "accuracy_multi": best_accuracy,
                "accuracy_multi_at_0.5": accuracy_multi(outputs, targets, 0.5),
                "threshold": best_threshold,
            },
            threshold=best_threshold,
            sweep=sweep,
        )

    def decode(self, outputs: Tensor, labels: Sequence[str], threshold: float) -> list[str]:
        return [_label_set(row >= threshold, labels) for row in outputs]

    def decode_targets(self, targets: Tensor, labels: Sequence[str]) -> list[str]:
        return [_label_set(row > 0.5, labels) for row in targets]

    def item_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        probabilities = outputs.clamp(1e-7, 1 - 1e-7)
        losses = F.binary_cross_entropy(probabilities, targets.float(), reduction="none")
        return losses.mean(dim=1)

    def class_report(
        self, outputs: Tensor, targets: Tensor, labels: Sequence[str], threshold: float
    ) -> str | None:
        # At the served threshold, the decisions the server makes.
        return _report(outputs >= threshold, targets.bool(), labels)

    def plots(
        self,
        evaluation: Evaluation,
        images: Tensor,
        outputs: Tensor,
        targets: Tensor,
        labels: Sequence[str],
        out_dir: Path,
    ) -> list[Path]:
        paths = super().plots(evaluation, images, outputs, targets, labels, out_dir)
        paths.append(out_dir / "threshold_sweep.png")
        plots.threshold_sweep(evaluation.sweep, evaluation.threshold, paths[-1])
        return paths


class Points(Task):
    name = "points"

    def n_outputs(self, n_labels: int) -> int:
        return 2 * n_labels

    def loss_function(self, label_smoothing: float = 0.0) -> LossFunction:
        def loss(raw: Tensor, targets: Tensor) -> Tensor:
            return F.mse_loss(self.activation(raw.float()), targets.reshape(len(targets), -1))

        return loss

    def activation(self, raw: Tensor) -> Tensor:
        return sigmoid_range(raw, *POINT_RANGE)

    def epoch_metrics(
        self, outputs: Tensor, targets: Tensor, geometries: Sequence[Geometry]
    ) -> dict[str, float]:
        return {"point_error_px": point_error_pixels(outputs, targets, geometries)}

    def evaluate(
        self,
        outputs: Tensor,
        targets: Tensor,
        geometries: Sequence[Geometry],
        labels: Sequence[str],
    ) -> Evaluation:
        return Evaluation(
            metrics={
                "point_error_px": point_error_pixels(outputs, targets, geometries),
                "mse": float(F.mse_loss(outputs, targets.reshape(len(targets), -1))),
            }
        )

    def decode(self, outputs: Tensor, labels: Sequence[str], threshold: float) -> list[str]:
        return [
            " ".join(f"({u:+.2f},{v:+.2f})" for u, v in row.reshape(-1, 2).tolist())
            for row in outputs
        ]

    def decode_targets(self, targets: Tensor, labels: Sequence[str]) -> list[str]:
        return self.decode(targets.reshape(len(targets), -1), labels, 0.0)

    def item_losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        squared = (outputs - targets.reshape(len(targets), -1)) ** 2
        return squared.mean(dim=1)

    def plots(
        self,
        evaluation: Evaluation,
        images: Tensor,
        outputs: Tensor,
        targets: Tensor,
        labels: Sequence[str],
        out_dir: Path,
    ) -> list[Path]:
        count = min(len(images), 16)
        path = out_dir / "points.png"
        plots.points_grid(
            images[:count],
            targets[:count].reshape(count, -1, 2),
            outputs[:count].reshape(count, -1, 2),
            path,
        )
        return [path]


TASKS: dict[str, Task] = {task.name: task for task in (Classification(), MultiLabel(), Points())}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}") from None


def sigmoid_range(x: Tensor, low: float, high: float) -> Tensor:
    return torch.sigmoid(x) * (high - low) + low


def accuracy(outputs: Tensor, targets: Tensor) -> float:
    return float((outputs.argmax(dim=1) == targets).float().mean())


def error_rate(outputs: Tensor, targets: Tensor) -> float:
    return 1.0 - accuracy(outputs, targets)


def confusion_matrix(predicted: Tensor, actual: Tensor, n_classes: int) -> Tensor:
    """Counts with actual classes as rows and predicted classes as columns."""
    flat = actual.long() * n_classes + predicted.long()
    return torch.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def most_confused(
    confusion: Tensor, labels: Sequence[str], min_count: int = 1
) -> list[tuple[str, str, int]]:
    """(actual, predicted, count) for off-diagonal cells, the most frequent first."""
    pairs = [
        (labels[a], labels[p], int(confusion[a, p]))
        for a in range(len(labels))
        for p in range(len(labels))
        if a != p and confusion[a, p] >= min_count
    ]
    return sorted(pairs, key=lambda pair: -pair[2])


def accuracy_multi(outputs: Tensor, targets: Tensor, threshold: float) -> float:
    # ">=" (fastai uses ">") so the offline metric counts ties exactly as the server decides them.
    return float(((outputs >= threshold) == targets.bool()).float().mean())


def threshold_sweep(outputs: Tensor, targets: Tensor) -> list[tuple[float, float]]:
    return [(t, accuracy_multi(outputs, targets, t)) for t in SWEEP_THRESHOLDS]


def points_to_original(points: Tensor, geometries: Sequence[Geometry]) -> Tensor:
    """[N, K, 2] normalised points to original-image pixels, one geometry per image."""
    columns = [
        (g.scale_x, g.offset_x, g.input_width, g.scale_y, g.offset_y, g.input_height)
        for g in geometries
    ]
    sx, ox, w, sy, oy, h = torch.tensor(columns, dtype=torch.float64).T.unsqueeze(-1)
    p = points.double()
    x = ox + sx * (p[..., 0] + 1.0) / 2.0 * w
    y = oy + sy * (p[..., 1] + 1.0) / 2.0 * h
    return torch.stack([x, y], dim=-1)


def point_error_pixels(outputs: Tensor, targets: Tensor, geometries: Sequence[Geometry]) -> float:
    """Mean Euclidean distance between predicted and true points, in original pixels."""
    predicted = points_to_original(outputs.reshape(len(outputs), -1, 2), geometries)
    actual = points_to_original(targets.reshape(len(targets), -1, 2), geometries)
    return float((predicted - actual).norm(dim=-1).mean())


def top_losses(task: Task, outputs: Tensor, targets: Tensor, count: int) -> list[tuple[int, float]]:
    """(index, loss) of the ``count`` images with the largest losses, largest first."""
    losses = task.item_losses(outputs, targets)
    values, indices = losses.topk(min(count, len(losses)))
    return list(zip(indices.tolist(), values.tolist(), strict=True))


def _report(predicted: Tensor, actual: Tensor, labels: Sequence[str]) -> str:
    """sklearn's classification_report layout from boolean [N, C] decisions and truths."""
    hits = (predicted & actual).sum(dim=0).double()
    chosen, support = predicted.sum(dim=0).double(), actual.sum(dim=0).double()
    precision = torch.where(chosen > 0, hits / chosen.clamp_min(1), 0.0)
    recall = torch.where(support > 0, hits / support.clamp_min(1), 0.0)
    total = precision + recall
    f1 = torch.where(total > 0, 2 * precision * recall / total.clamp_min(1e-12), 0.0)
    width = max(12, *(len(label) for label in labels))
    lines = [f"{'':<{width}}  precision     recall   f1-score    support"]
    for i, label in enumerate(labels):
        lines.append(
            f"{label:<{width}}  {precision[i]:9.4f}  {recall[i]:9.4f}  {f1[i]:9.4f}  "
            f"{int(support[i]):9d}"
        )
    lines.append(
        f"{'macro avg':<{width}}  {precision.mean():9.4f}  {recall.mean():9.4f}  "
        f"{f1.mean():9.4f}  {int(support.sum()):9d}"
    )
    return "\n".join(lines)


def _label_set(mask: Tensor, labels: Sequence[str]) -> str:
    chosen = [labels[i] for i in mask.nonzero().flatten().tolist()]
    return ",".join(chosen) if chosen else "(none)"
