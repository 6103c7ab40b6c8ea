"""From a model's raw outputs to the typed result of one image.

``resolve_options`` merges a request's options with the model's configured defaults
once per request (and refuses bad values with ``InvalidInput`` naming the field);
``finish`` turns the rows the model returned for one image's views into its result.

Test-time augmentation blends like fastai's ``Learner.tta``: the mean over the
augmented views, then ``lerp(aug_mean, plain, beta) = (1 - beta) * aug_mean + beta *
plain``. Scores are blended as probabilities. Points are first mapped back to
original-image pixels through each view's own geometry (a flip mirrors x, a zoom
crop shifts and scales), and only then blended, because the views' [-1, 1] frames
differ from one another.

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
class ClassificationResult:
    top: list[LabelScore]
    below_min_confidence: bool
    min_confidence: float


@dataclass(frozen=True)
class MultiLabelResult:
    labels: list[LabelScore]
    all_scores: list[LabelScore]


@dataclass(frozen=True)
class PointResult:
    name: str
    # Original-image pixels, after EXIF orientation.
    x: float
    y: float
    # The model's coordinates in the identity view: -1 left/top edge, +1 right/bottom.
    x_normalized: float
    y_normalized: float


@dataclass(frozen=True)
class PointsResult:
    points: list[PointResult]


@dataclass(frozen=True)
class ImageResult:
    result: ClassificationResult | MultiLabelResult | PointsResult
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
    expected = (len(resolved.views), config.output_width)
    if outputs.shape != expected:
        raise ValueError(f"model {config.name} returned shape {outputs.shape}, expected {expected}")
    if len(geometries) != len(resolved.views):
        raise ValueError(f"{len(geometries)} geometries for {len(resolved.views)} views")
    result: ClassificationResult | MultiLabelResult | PointsResult
    if config.task == "points":
        result = _points(config, resolved, outputs, geometries)
    else:
        scores = _blend(outputs.astype(np.float64), resolved.beta)
        if config.task == "classification":
            result = _classification(config, resolved, scores)
        else:
            result = _multilabel(config, resolved, scores)
    return ImageResult(
        result=result,
        tta_applied=resolved.tta_applied,
        tta_views=len(resolved.views),
        original_width=geometries[0].original_width,
        original_height=geometries[0].original_height,
    )


def _blend(rows: np.ndarray, beta: float) -> np.ndarray:
    """fastai's TTA blend of ``rows`` (identity first); one row is returned unchanged."""
    plain: np.ndarray = rows[0]
    if len(rows) == 1:
        return plain
    aug_mean: np.ndarray = rows[1:].mean(axis=0)
    blended: np.ndarray = (1.0 - beta) * aug_mean + beta * plain
    return blended


def _as_reported(value: float) -> float:
    # Scores travel as float32; deciding in float32 keeps "score == threshold is
    # included" true for the numbers the caller actually sees.
    return float(np.float32(value))


def _classification(
    config: ModelConfig, resolved: ResolvedOptions, scores: np.ndarray
) -> ClassificationResult:
    # Stable sort: ties keep vocabulary order, so equal scores come back deterministically.
    order = np.argsort(-scores, kind="stable")[: resolved.top_k]
    top = [LabelScore(config.labels[i], _as_reported(scores[i]), 0.0) for i in order]
    best = top[0].score
    return ClassificationResult(
        top=top,
        below_min_confidence=best < _as_reported(resolved.min_confidence),
        min_confidence=resolved.min_confidence,
    )


def _multilabel(
    config: ModelConfig, resolved: ResolvedOptions, scores: np.ndarray
) -> MultiLabelResult:
    every = [
        LabelScore(label, _as_reported(score), float(threshold))
        for label, score, threshold in zip(config.labels, scores, resolved.thresholds, strict=True)
    ]
    chosen = [item for item in every if item.score >= _as_reported(item.threshold)]
    chosen.sort(key=lambda item: item.score, reverse=True)
    return MultiLabelResult(labels=chosen, all_scores=every if resolved.all_scores else [])


def _points(
    config: ModelConfig,
    resolved: ResolvedOptions,
    outputs: np.ndarray,
    geometries: Sequence[Geometry],
) -> PointsResult:
    coords = outputs.astype(np.float64).reshape(len(geometries), len(config.labels), 2)
    # Every view's prediction in original pixels first: the views' own frames differ.
    original = np.array(
        [
            [geometry.normalized_to_original(u, v) for u, v in view_coords]
            for geometry, view_coords in zip(geometries, coords, strict=True)
        ]
    )
    blended = _blend(original, resolved.beta)
    points = []
    for name, (x, y) in zip(config.labels, blended, strict=True):
        u, v = geometries[0].original_to_normalized(x, y)
        points.append(PointResult(name, float(x), float(y), float(u), float(v)))
    return PointsResult(points=points)


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
