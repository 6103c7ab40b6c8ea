"""From a model's raw outputs to the typed result of one image.

``resolve_options`` merges a request's options with the model's configured defaults
once per request (and refuses bad values with ``InvalidInput`` naming the field);
``finish`` turns the rows the model returned for one image's views into its result,
through the image's task module in ``visionrpc.server.tasks``.

Test-time augmentation blends like fastai's ``Learner.tta``: the mean over the
augmented views, then ``lerp(aug_mean, plain, beta) = (1 - beta) * aug_mean + beta *
plain`` (``tasks.base.blend``). Scores are blended as probabilities; points in
original-image pixels (see ``tasks.points``).

Options that do not apply to a model's task (``top_k`` for multilabel, thresholds for
classification, ...) are still checked but change nothing, so one client can send the
same options to every model. ``tta_views`` alone does not switch TTA on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidInput
from .model_config import ModelConfig
from .preprocess import IDENTITY, Geometry, View, parse_view
from .tasks import (
    ClassificationResult,
    LabelScore,
    MultiLabelResult,
    PointResult,
    PointsResult,
    ResolvedOptions,
    TaskResult,
    serving_task,
)

# Re-exported: the results and option types were defined here before the task registry.
__all__ = [
    "ClassificationResult",
    "ImageResult",
    "LabelScore",
    "MultiLabelResult",
    "PointResult",
    "PointsResult",
    "PredictionOptions",
    "ResolvedOptions",
    "finish",
    "resolve_options",
]


@dataclass(frozen=True)
class PredictionOptions:
    """A request's options; None (or empty) takes the model's configured default."""

    top_k: int | None = None
    threshold: float | None = None
    class_thresholds: Mapping[str, float] = field(default_factory=dict)
    min_confidence: float | None = None
    tta: bool | None = None
    tta_views: int | None = None
    all_scores: bool = False


@dataclass(frozen=True)
class ImageResult:
    result: TaskResult
    tta_applied: bool
    # Views blended, identity included.
    tta_views: int
    original_width: int
    original_height: int


def resolve_options(config: ModelConfig, options: PredictionOptions) -> ResolvedOptions:
    """Merge a request's options with the model's defaults; InvalidInput names a bad field."""
    top_k = config.top_k if options.top_k is None else options.top_k
    if options.top_k is not None and options.top_k < 1:
        raise InvalidInput(f"options.top_k: must be at least 1, not {options.top_k}")
    min_confidence = config.min_confidence
    if options.min_confidence is not None:
        min_confidence = _probability(options.min_confidence, "options.min_confidence")
    views = _views(config, options)
    return ResolvedOptions(
        top_k=min(top_k, len(config.labels)),
        thresholds=_thresholds(config, options),
        min_confidence=min_confidence,
        views=views,
        beta=config.tta.beta,
        all_scores=options.all_scores,
        tta_applied=len(views) > 1,
    )


def finish(
    config: ModelConfig,
    resolved: ResolvedOptions,
    outputs: np.ndarray,
    geometries: Sequence[Geometry],
) -> ImageResult:
    """One image's result from its model outputs, one row per view in ``resolved.views`` order.

    A wrong output shape is the model's fault, not the caller's: it raises ValueError.
    """
    task = serving_task(config.task)
    expected = (len(resolved.views), task.output_width(config))
    if outputs.shape != expected:
        raise ValueError(f"model {config.name} returned shape {outputs.shape}, expected {expected}")
    if len(geometries) != len(resolved.views):
        raise ValueError(f"{len(geometries)} geometries for {len(resolved.views)} views")
    result: TaskResult = task.postprocess(config, resolved, outputs, geometries)
    return ImageResult(
        result=result,
        tta_applied=resolved.tta_applied,
        tta_views=len(resolved.views),
        original_width=geometries[0].original_width,
        original_height=geometries[0].original_height,
    )


def _thresholds(config: ModelConfig, options: PredictionOptions) -> np.ndarray:
    # A request's global threshold is "one threshold for every label": it replaces the
    # configured per-label defaults too; its own per-label thresholds win over it.
    if options.threshold is not None:
        base = _probability(options.threshold, "options.threshold")
        thresholds = np.full(len(config.labels), base)
    else:
        thresholds = np.full(len(config.labels), config.threshold)
        for label, value in config.class_thresholds.items():
            thresholds[config.labels.index(label)] = value
    for label, value in options.class_thresholds.items():
        field_name = f"options.class_thresholds[{label!r}]"
        if label not in config.labels:
            raise InvalidInput(f"{field_name}: unknown label")
        thresholds[config.labels.index(label)] = _probability(value, field_name)
    return thresholds


def _views(config: ModelConfig, options: PredictionOptions) -> tuple[View, ...]:
    configured = config.tta.views
    if options.tta_views is not None and not 1 <= options.tta_views <= len(configured):
        raise InvalidInput(
            f"options.tta_views: must be between 1 and {len(configured)} "
            f"(the views model {config.name} declares), not {options.tta_views}"
        )
    if options.tta and not configured:
        raise InvalidInput(f"options.tta: model {config.name} declares no TTA views")
    enabled = config.tta.enabled if options.tta is None else options.tta
    if not enabled:
        return (IDENTITY,)
    count = len(configured) if options.tta_views is None else options.tta_views
    return (IDENTITY, *(parse_view(name, zoom=config.tta.zoom) for name in configured[:count]))


def _probability(value: float, field_name: str) -> float:
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise InvalidInput(f"{field_name}: must be in [0, 1], not {value}")
    return float(value)
