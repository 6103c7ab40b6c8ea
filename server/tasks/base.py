"""What every serving task shares: resolved options, blending, and the task interface.

A task module (``classification``, ``multilabel``, ``points``) holds everything that
differs per task on the serving side: its postprocessing, what it reports to the
metrics, and its conversion to each protocol's messages (visionrpc.v1 protobuf, and
the Open Inference Protocol's typed tensors as numpy columns). ``ServingTask`` is the
interface each module provides; ``visionrpc.server.tasks.serving_task`` finds one by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from visionrpc.protos import inference_pb2 as pb

from ..model_config import ModelConfig
from ..preprocess import Geometry
from ..views import View


@dataclass(frozen=True)
class ResolvedOptions:
    """Options with every default filled in, checked against one model."""

    top_k: int
    # One threshold per label, in vocabulary order.
    thresholds: np.ndarray
    min_confidence: float
    # The views to run, identity first.
    views: tuple[View, ...]
    beta: float
    all_scores: bool
    tta_applied: bool


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float
    # multilabel: the threshold applied to this label; 0 for classification.
    threshold: float


@dataclass(frozen=True)
class OutputTensor:
    """One Open Inference Protocol output: its name, data type and shape per image."""

    name: str
    datatype: str
    # Without the leading image dimension; -1 where the size varies per request.
    shape: tuple[int, ...]
    description: str


class PredictionObserver(Protocol):
    """What the answers look like, for dashboards; ``metrics.ServerMetrics`` implements it."""

    def classification_observed(self, model: str, version: str, top1_score: float) -> None: ...
    def multilabel_observed(self, model: str, version: str, labels_count: int) -> None: ...
    def points_observed(
        self,
        model: str,
        version: str,
        xs_normalized: Iterable[float],
        ys_normalized: Iterable[float],
    ) -> None: ...


class ServingTask(Protocol):
    """The serving side of one task; each task module provides these names."""

    NAME: str

    def output_width(self, config: ModelConfig) -> int:
        """The number of floats the model returns per image (its output is [batch, width])."""

    def postprocess(
        self,
        config: ModelConfig,
        resolved: ResolvedOptions,
        outputs: np.ndarray,
        geometries: Sequence[Geometry],
    ) -> Any:
        """One image's result from its rows of model outputs, one row per view."""

    def observe(
        self, observer: PredictionObserver, model: str, version: str, result: Any
    ) -> None: ...

    def to_v1(self, result: Any, message: pb.ImageResult) -> None:
        """Fill the task's field of a visionrpc.v1 ImageResult."""

    def v2_outputs(self, config: ModelConfig) -> tuple[OutputTensor, ...]: ...

    def to_v2(self, config: ModelConfig, results: Sequence[Any | None]) -> dict[str, np.ndarray]:
        """One array per output of ``v2_outputs``, one row per image (None: a failed one)."""


def blend(rows: np.ndarray, beta: float) -> np.ndarray:
    """fastai's TTA blend of ``rows`` (identity first); one row is returned unchanged."""
    plain: np.ndarray = rows[0]
    if len(rows) == 1:
        return plain
    aug_mean: np.ndarray = rows[1:].mean(axis=0)
    blended: np.ndarray = (1.0 - beta) * aug_mean + beta * plain
    return blended


def as_reported(value: float) -> float:
    # Scores travel as float32; deciding in float32 keeps "score == threshold is
    # included" true for the numbers the caller actually sees.
    return float(np.float32(value))
