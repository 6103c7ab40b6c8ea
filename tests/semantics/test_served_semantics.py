"""Prediction semantics through a real server: thresholds, min_confidence, TTA, points.

The models are analytic ONNX graphs, so every expected number is worked out by hand
in the test next to it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.helpers import images
from tests.helpers.onnx_models import (
    write_centroid_points,
    write_channel_mean_classifier,
    write_channel_mean_multilabel,
)
from tests.helpers.server import server_in_thread
from tests.semantics.asymmetric_models import (
    sides_scores,
    write_fixed_point_model,
    write_sides_model,
)
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.server.model_config import InputSpec
from visionrpc.server.preprocess import parse_view, prepare

# softmax([ln 3, 0]) = (3/4, 1/4): a white left half against a black right half.
LN3 = math.log(3.0)


@dataclass(frozen=True)
class Served:
    stub: pb_grpc.InferenceServiceStub


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    repository = tmp_path_factory.mktemp("repository")
    write_sides_model(
        repository,
        "sides",
        "classification",
        size=8,
        temperature=LN3,
        tta={"enabled": False, "views": ["flip", "zoom_center"]},
    )
    write_fixed_point_model(
        repository,
        "fixed",
        (0.5, -0.25),
        16,
        16,
        "crop",
        tta={"enabled": True, "views": ["flip", "zoom_tl"], "zoom": 1.25},
    )
    write_centroid_points(repository, "centroid", size=32, tta={"enabled": True, "views": ["flip"]})
    write_channel_mean_multilabel(
        repository, "channels", threshold=0.5, class_thresholds={"green": 0.39}
    )
    write_channel_mean_classifier(repository, "colors", min_confidence=0.9, top_k=2)
    with (
        server_in_thread(Path(repository)) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        yield Served(pb_grpc.InferenceServiceStub(channel))


def predict(served: Served, model: str, image: pb.Image, **options: Any) -> pb.ImageResult:
    request = pb.PredictRequest(
        model=model,
        images=[image],
        options=pb.PredictionOptions(**options),
    )
    response = served.stub.Predict(request, timeout=30)
    (result,) = response.results
    assert result.WhichOneof("result") != "error", result.error.message
    return result


def raw(array: np.ndarray) -> pb.Image:
    height, width, channels = array.shape
    return pb.Image(
        raw=pb.RawImage(
            pixels=array.astype(np.uint8).tobytes(), height=height, width=width, channels=channels
        )
    )


def solid(colour: tuple[int, int, int], size: int = 8) -> pb.Image:
    return raw(np.full((size, size, 3), colour, dtype=np.uint8))


def left_white_right_black() -> np.ndarray:
    array = np.zeros((8, 8, 3), dtype=np.uint8)
    array[:, :4] = 255
    return array


def labels(items: Iterable[pb.LabelScore]) -> list[str]:
    return [item.label for item in items]


def scores(items: Iterable[pb.LabelScore]) -> list[float]:
    return [item.score for item in items]


# test-time augmentation through a flip


def test_without_tta_the_left_half_wins(served: Served) -> None:
    result = predict(served, "sides", raw(left_white_right_black()))
    assert labels(result.classification.top) == ["left", "right"]
    assert scores(result.classification.top) == pytest.approx([0.75, 0.25], abs=1e-6)
    assert (result.tta_applied, result.tta_views) == (False, 1)


def test_tta_blends_the_flipped_view_by_beta(served: Served) -> None:
    # flip swaps the halves: (1/4, 3/4). 0.75 * flipped + 0.25 * plain = (0.375, 0.625).
    encoded = pb.Image(encoded=images.encode(Image.fromarray(left_white_right_black()), "PNG"))
    result = predict(served, "sides", encoded, tta=True, tta_views=1)
    assert labels(result.classification.top) == ["right", "left"]
    assert scores(result.classification.top) == pytest.approx([0.625, 0.375], abs=1e-6)
    assert (result.tta_applied, result.tta_views) == (True, 2)


def test_tta_with_every_configured_view_blends_the_reference_scores(served: Served) -> None:
    # zoom_center resamples across the seam, so its row comes from the numpy reference
    # of the model on the view that preprocess prepares.
    image = Image.fromarray(left_white_right_black())
    rows = [
        sides_scores(
            prepare(image, InputSpec(8, 8, "squish"), parse_view(name, zoom=1.15))[0],
            "classification",
            LN3,
        )
        for name in ["identity", "flip", "zoom_center"]
    ]
    expected = 0.75 * (rows[1] + rows[2]) / 2 + 0.25 * rows[0]
    result = predict(served, "sides", raw(left_white_right_black()), tta=True)
    by_label = {s.label: s.score for s in result.classification.top}
    assert [by_label["left"], by_label["right"]] == pytest.approx(expected.tolist(), abs=1e-6)
    assert (result.tta_applied, result.tta_views) == (True, 3)


# points through flip and zoom views


def test_points_without_tta_are_in_original_pixels(served: Served) -> None:
    # 64x32 centre-cropped to 32x32 at x=16, scale 2. (0.5, -0.25) is input (12, 6).
    image = pb.Image(encoded=images.encode(images.noisy(64, 32), "PNG"))
    result = predict(served, "fixed", image, tta=False)
    (head,) = result.points.points
    assert head.name == "head"
    assert (head.x, head.y) == pytest.approx((40.0, 12.0))
    assert (head.x_normalized, head.y_normalized) == pytest.approx((0.5, -0.25))
    assert (result.original_width, result.original_height) == (64, 32)


def test_points_tta_maps_each_view_to_original_pixels_then_blends(served: Served) -> None:
    # identity: (16 + 2 * 12, 2 * 6)                   = (40, 12)
    # flip:     (16 + 2 * (16 - 12), 12)               = (24, 12)
    # zoom_tl:  box 25.6 at (16, 0), scale 1.6: (16 + 1.6 * 12, 1.6 * 6) = (35.2, 9.6)
    # blend:    0.75 * (29.6, 10.8) + 0.25 * (40, 12)  = (32.2, 11.1)
    # identity frame: input (8.1, 5.55) of 16          = (0.0125, -0.30625)
    image = pb.Image(encoded=images.encode(images.noisy(64, 32), "PNG"))
    result = predict(served, "fixed", image)
    (head,) = result.points.points
    assert (head.x, head.y) == pytest.approx((32.2, 11.1), abs=1e-4)
    assert (head.x_normalized, head.y_normalized) == pytest.approx((0.0125, -0.30625), abs=1e-6)
    assert (result.tta_applied, result.tta_views) == (True, 3)


@pytest.mark.parametrize("tta", [False, True])
def test_a_dot_in_an_exif_rotated_jpeg_is_found_in_displayed_pixels(
    served: Served, tta: bool
) -> None:
    # Stored 120x80 with the dot at (30.5, 20.5); orientation 6 shows it 80x120 at (59.5, 30.5).
    stored = images.dot(120, 80, (30.5, 20.5), radius=10)
    image = pb.Image(encoded=images.exif_jpeg(stored, 6))
    result = predict(served, "centroid", image, tta=tta)
    (point,) = result.points.points
    assert (result.original_width, result.original_height) == (80, 120)
    assert (point.x, point.y) == pytest.approx((59.5, 30.5), abs=1.0)
    assert result.tta_applied == tta


# multilabel thresholds over the wire; scores are channel / 255


def test_configured_thresholds_apply_and_are_reported(served: Served) -> None:
    # red 128/255 = 0.502, green 100/255 = 0.392, blue 200/255 = 0.784
    result = predict(served, "channels", solid((128, 100, 200)))
    assert labels(result.multilabel.labels) == ["blue", "red", "green"]
    assert [s.threshold for s in result.multilabel.labels] == pytest.approx([0.5, 0.5, 0.39])
    assert list(result.multilabel.all_scores) == []


def test_request_threshold_replaces_the_configured_ones(served: Served) -> None:
    result = predict(served, "channels", solid((128, 100, 200)), threshold=0.6)
    assert labels(result.multilabel.labels) == ["blue"]
    assert result.multilabel.labels[0].threshold == pytest.approx(0.6)


def test_request_class_threshold_overrides_one_label(served: Served) -> None:
    result = predict(served, "channels", solid((128, 100, 200)), class_thresholds={"blue": 0.9})
    assert labels(result.multilabel.labels) == ["red", "green"]


def test_a_score_sent_back_as_its_threshold_is_included(served: Served) -> None:
    every = predict(served, "channels", solid((128, 100, 200)), all_scores=True)
    assert labels(every.multilabel.all_scores) == ["red", "green", "blue"]
    green = every.multilabel.all_scores[1].score
    assert green == pytest.approx(100 / 255, abs=1e-6)
    at = predict(served, "channels", solid((128, 100, 200)), class_thresholds={"green": green})
    assert "green" in labels(at.multilabel.labels)
    just_above = float(np.nextafter(np.float32(green), np.float32(1.0)))
    above = predict(
        served, "channels", solid((128, 100, 200)), class_thresholds={"green": just_above}
    )
    assert "green" not in labels(above.multilabel.labels)


# classification: top_k and min_confidence


def test_configured_min_confidence_and_top_k(served: Served) -> None:
    # grey: three equal channel means, so every class scores 1/3 < 0.9
    result = predict(served, "colors", solid((90, 90, 90))).classification
    assert len(result.top) == 2
    assert result.top[0].score == pytest.approx(1 / 3, abs=1e-6)
    assert result.below_min_confidence
    assert result.min_confidence == pytest.approx(0.9)


def test_request_min_confidence_and_top_k_override(served: Served) -> None:
    result = predict(served, "colors", solid((90, 90, 90)), min_confidence=0.3, top_k=10)
    assert len(result.classification.top) == 3
    assert not result.classification.below_min_confidence
    assert result.classification.min_confidence == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("model", "options", "field"),
    [
        ("channels", {"threshold": 1.5}, "options.threshold"),
        ("channels", {"class_thresholds": {"purple": 0.5}}, "options.class_thresholds['purple']"),
        ("channels", {"class_thresholds": {"red": -0.1}}, "options.class_thresholds['red']"),
        ("colors", {"min_confidence": float("nan")}, "options.min_confidence"),
        ("colors", {"top_k": 0}, "options.top_k"),
        ("sides", {"tta": True, "tta_views": 0}, "options.tta_views"),
        ("sides", {"tta": True, "tta_views": 3}, "options.tta_views"),
    ],
)
def test_bad_options_are_invalid_argument_naming_the_field(
    served: Served, model: str, options: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        predict(served, model, solid((1, 2, 3)), **options)
    error = raised.value
    assert isinstance(error, grpc.Call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(field)


# GetModelInfo shows every default in force


def test_model_info_shows_the_multilabel_defaults(served: Served) -> None:
    info = served.stub.GetModelInfo(pb.GetModelInfoRequest(model="channels"), timeout=30)
    assert info.task == pb.MODEL_TASK_MULTILABEL
    assert list(info.labels) == ["red", "green", "blue"]
    assert info.threshold == pytest.approx(0.5)
    assert dict(info.class_thresholds) == {"green": pytest.approx(0.39)}
    assert (info.input.height, info.input.width, info.input.resize_method) == (8, 8, "squish")


def test_model_info_shows_the_classification_and_tta_defaults(served: Served) -> None:
    colors = served.stub.GetModelInfo(pb.GetModelInfoRequest(model="colors"), timeout=30)
    assert colors.min_confidence == pytest.approx(0.9)
    # No ModelInfo field carries top_k: only the config JSON does.
    assert json.loads(colors.config_json)["top_k"] == 2
    fixed = served.stub.GetModelInfo(pb.GetModelInfoRequest(model="fixed"), timeout=30)
    assert (fixed.tta.enabled, list(fixed.tta.views)) == (True, ["flip", "zoom_tl"])
    assert fixed.tta.beta == pytest.approx(0.25)
    assert json.loads(fixed.config_json)["tta"]["zoom"] == pytest.approx(1.25)
