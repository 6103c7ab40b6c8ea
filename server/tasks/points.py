"""Points: the model's [-1, 1] coordinates in, named points in original-image pixels out.

Every TTA view's prediction is first mapped back to original pixels through that view's
own geometry (a flip mirrors x, a zoom crop shifts and scales) and only then blended,
because the views' [-1, 1] frames differ from one another.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from visionrpc.protos import inference_pb2 as pb

from ..model_config import ModelConfig
from ..preprocess import Geometry
from .base import OutputTensor, PredictionObserver, ResolvedOptions, blend

NAME = "points"


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


def output_width(config: ModelConfig) -> int:
    """Two floats per point, ``x0, y0, x1, y1, ...``, each in [-1, 1]."""
    return 2 * len(config.labels)


def postprocess(
    config: ModelConfig,
    resolved: ResolvedOptions,
    outputs: np.ndarray,
    geometries: Sequence[Geometry],
) -> PointsResult:
    coords = outputs.astype(np.float64).reshape(len(geometries), len(config.labels), 2)
    original = np.array(
        [
            [geometry.normalized_to_original(u, v) for u, v in view_coords]
            for geometry, view_coords in zip(geometries, coords, strict=True)
        ]
    )
    blended = blend(original, resolved.beta)
    points = []
    for name, (x, y) in zip(config.labels, blended, strict=True):
        u, v = geometries[0].original_to_normalized(x, y)
        points.append(PointResult(name, float(x), float(y), float(u), float(v)))
    return PointsResult(points=points)


def observe(observer: PredictionObserver, model: str, version: str, result: PointsResult) -> None:
    xs: Iterable[float] = [point.x_normalized for point in result.points]
    ys: Iterable[float] = [point.y_normalized for point in result.points]
    observer.points_observed(model, version, xs, ys)


def to_v1(result: PointsResult, message: pb.ImageResult) -> None:
    message.points.CopyFrom(
        pb.PointList(
            points=[
                pb.Point(
                    name=point.name,
                    x=point.x,
                    y=point.y,
                    x_normalized=point.x_normalized,
                    y_normalized=point.y_normalized,
                )
                for point in result.points
            ]
        )
    )


def v2_outputs(config: ModelConfig) -> tuple[OutputTensor, ...]:
    count = len(config.labels)
    return (
        OutputTensor("points", "FP32", (count, 2), "x, y in original-image pixels"),
        OutputTensor("points_normalized", "FP32", (count, 2), "x, y in the model's frame, -1 to 1"),
    )


def to_v2(config: ModelConfig, results: Sequence[PointsResult | None]) -> dict[str, np.ndarray]:
    shape = (len(results), len(config.labels), 2)
    pixels = np.full(shape, np.nan, dtype=np.float32)
    normalized = np.full(shape, np.nan, dtype=np.float32)
    for row, result in enumerate(results):
        if result is None:
            continue
        pixels[row] = [(point.x, point.y) for point in result.points]
        normalized[row] = [(point.x_normalized, point.y_normalized) for point in result.points]
    return {"points": pixels, "points_normalized": normalized}
