"""Multilabel: sigmoid scores in, the labels at or above their thresholds out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from visionrpc.protos import inference_pb2 as pb

from ..model_config import ModelConfig
from ..preprocess import Geometry
from .base import LabelScore, OutputTensor, PredictionObserver, ResolvedOptions, as_reported, blend

NAME = "multilabel"


@dataclass(frozen=True)
class MultiLabelResult:
    labels: list[LabelScore]
    # Every label in vocabulary order, when the request asked for all_scores.
    all_scores: list[LabelScore]


def output_width(config: ModelConfig) -> int:
    """One probability per label."""
    return len(config.labels)


def postprocess(
    config: ModelConfig,
    resolved: ResolvedOptions,
    outputs: np.ndarray,
    geometries: Sequence[Geometry],
) -> MultiLabelResult:
    scores = blend(outputs.astype(np.float64), resolved.beta)
    every = [
        LabelScore(label, as_reported(score), float(threshold))
        for label, score, threshold in zip(config.labels, scores, resolved.thresholds, strict=True)
    ]
    chosen = [item for item in every if item.score >= as_reported(item.threshold)]
    chosen.sort(key=lambda item: item.score, reverse=True)
    return MultiLabelResult(labels=chosen, all_scores=every if resolved.all_scores else [])


def observe(
    observer: PredictionObserver, model: str, version: str, result: MultiLabelResult
) -> None:
    observer.multilabel_observed(model, version, len(result.labels))


def to_v1(result: MultiLabelResult, message: pb.ImageResult) -> None:
    message.multilabel.CopyFrom(
        pb.MultiLabel(
            labels=[_label_score(item) for item in result.labels],
            all_scores=[_label_score(item) for item in result.all_scores],
        )
    )


def _label_score(item: LabelScore) -> pb.LabelScore:
    return pb.LabelScore(label=item.label, score=item.score, threshold=item.threshold)


def v2_outputs(config: ModelConfig) -> tuple[OutputTensor, ...]:
    count = len(config.labels)
    return (
        OutputTensor("labels", "BYTES", (count,), "every label, highest score first"),
        OutputTensor("scores", "FP32", (count,), "their probabilities, in the same order"),
        OutputTensor("predicted", "BOOL", (count,), "the score is at or above its threshold"),
        OutputTensor("thresholds", "FP32", (count,), "the threshold applied to each label"),
    )


def to_v2(config: ModelConfig, results: Sequence[MultiLabelResult | None]) -> dict[str, np.ndarray]:
    """Every label per image, sorted by score, so the rows are rectangular.

    The predicted labels, in order, are the ``predicted`` entries of a row: the same
    list as visionrpc.v1's ``labels``. Needs results made with ``all_scores``.
    """
    shape = (len(results), len(config.labels))
    labels = np.full(shape, b"", dtype=object)
    scores = np.full(shape, np.nan, dtype=np.float32)
    predicted = np.zeros(shape, dtype=bool)
    thresholds = np.full(shape, np.nan, dtype=np.float32)
    for row, result in enumerate(results):
        if result is None:
            continue
        if len(result.all_scores) != len(config.labels):
            raise ValueError("multilabel results for V2 need all_scores")
        # Stable: ties keep vocabulary order, as visionrpc.v1's labels do.
        ordered = sorted(result.all_scores, key=lambda item: item.score, reverse=True)
        labels[row] = [item.label.encode() for item in ordered]
        scores[row] = [item.score for item in ordered]
        thresholds[row] = [item.threshold for item in ordered]
        predicted[row] = [item.score >= as_reported(item.threshold) for item in ordered]
    return {"labels": labels, "scores": scores, "predicted": predicted, "thresholds": thresholds}
