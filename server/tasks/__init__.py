"""The serving side's task registry: one module per task, found by the config's task name.

Adding a task is one module here (and its training twin in ``visionrpc.training.tasks``);
adding a protocol is one conversion function per task module plus the protocol's servicer.
"""

from __future__ import annotations

from . import classification, multilabel, points
from .base import LabelScore, OutputTensor, PredictionObserver, ResolvedOptions, ServingTask
from .classification import ClassificationResult
from .multilabel import MultiLabelResult
from .points import PointResult, PointsResult

TaskResult = ClassificationResult | MultiLabelResult | PointsResult

_REGISTRY: dict[str, ServingTask] = {
    classification.NAME: classification,
    multilabel.NAME: multilabel,
    points.NAME: points,
}


def serving_task(name: str) -> ServingTask:
    """The task module for a config's ``task``; model_config has already checked the name."""
    return _REGISTRY[name]


__all__ = [
    "ClassificationResult",
    "LabelScore",
    "MultiLabelResult",
    "OutputTensor",
    "PointResult",
    "PointsResult",
    "PredictionObserver",
    "ResolvedOptions",
    "ServingTask",
    "TaskResult",
    "serving_task",
]
