"""Classification: softmax scores in, the top-k labels out (below min_confidence flagged)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from visionrpc.protos import inference_pb2 as pb

from ..model_config import ModelConfig
from ..preprocess import Geometry
from .base import LabelScore, OutputTensor, PredictionObserver, ResolvedOptions, as_reported, blend

NAME = "classification"


@dataclass(frozen=True)
class ClassificationResult:
    top: list[LabelScore]
    below_min_confidence: bool
    min_confidence: float


def output_width(config: ModelConfig) -> int:
    """One probability per label."""
    return len(config.labels)


def postprocess(
    config: ModelConfig,
    resolved: ResolvedOptions,
    outputs: np.ndarray,
    geometries: Sequence[Geometry],
) -> ClassificationResult:
    scores = blend(outputs.astype(np.float64), resolved.beta)
    # Stable sort: ties keep vocabulary order, so equal scores come back deterministically.
    order = np.argsort(-scores, kind="stable")[: resolved.top_k]
    top = [LabelScore(config.labels[i], as_reported(scores[i]), 0.0) for i in order]
    return ClassificationResult(
        top=top,
        below_min_confidence=top[0].score < as_reported(resolved.min_confidence),
        min_confidence=resolved.min_confidence,
    )


def observe(
    observer: PredictionObserver, model: str, version: str, result: ClassificationResult
) -> None:
    if result.top:
        observer.classification_observed(model, version, result.top[0].score)


def to_v1(result: ClassificationResult, message: pb.ImageResult) -> None:
    message.classification.CopyFrom(
        pb.Classification(
            top=[pb.LabelScore(label=i.label, score=i.score) for i in result.top],
            below_min_confidence=result.below_min_confidence,
            min_confidence=result.min_confidence,
        )
    )


def v2_outputs(config: ModelConfig) -> tuple[OutputTensor, ...]:
    return (
        OutputTensor("labels", "BYTES", (-1,), "the top-k labels, best first (k: top_k)"),
        OutputTensor("scores", "FP32", (-1,), "their probabilities, in the same order"),
        OutputTensor("below_min_confidence", "BOOL", (), "the best score is under min_confidence"),
    )


def to_v2(
    config: ModelConfig, results: Sequence[ClassificationResult | None]
) -> dict[str, np.ndarray]:
    # Every answered image of a request has the same k; failed images get empty rows.
    k = max((len(result.top) for result in results if result is not None), default=0)
    labels = np.full((len(results), k), b"", dtype=object)
    scores = np.full((len(results), k), np.nan, dtype=np.float32)
    below = np.zeros(len(results), dtype=bool)
    for row, result in enumerate(results):
        if result is None:
            continue
        labels[row] = [item.label.encode() for item in result.top]
        scores[row] = [item.score for item in result.top]
        below[row] = result.below_min_confidence
    return {"labels": labels, "scores": scores, "below_min_confidence": below}
