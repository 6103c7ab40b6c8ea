"""Prediction semantics with hand-computed expectations: thresholds, top-k, TTA, points."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
from PIL import Image

from visionrpc.server.errors import InvalidInput
from visionrpc.server.model_config import ModelConfig, model_config_from_dict
from visionrpc.server.postprocess import (
    ClassificationResult,
    ImageResult,
    LabelScore,
    MultiLabelResult,
    PointsResult,
    PredictionOptions,
    ResolvedOptions,
    finish,
    resolve_options,
)
from visionrpc.server.preprocess import Geometry, prepare


def config(task: str, labels: list[str], **fields: Any) -> ModelConfig:
    data: dict[str, Any] = {
        "name": "m",
        "task": task,
        "labels": labels,
        "input": {"height": 50, "width": 50, "resize_method": "crop"},
    }
    return model_config_from_dict(data | fields)


def geometries(
    model: ModelConfig, resolved: ResolvedOptions, size: tuple[int, int]
) -> list[Geometry]:
    image = Image.new("RGB", size)
    return [prepare(image, model.input, view)[1] for view in resolved.views]


def predict(
    model: ModelConfig,
    rows: list[list[float]],
    options: PredictionOptions | None = None,
    size: tuple[int, int] = (200, 100),
) -> ImageResult:
    resolved = resolve_options(model, options or PredictionOptions())
    outputs = np.array(rows, dtype=np.float32)
    return finish(model, resolved, outputs, geometries(model, resolved, size))


def classification(result: ImageResult) -> ClassificationResult:
    assert isinstance(result.result, ClassificationResult)
    return result.result


def multilabel(result: ImageResult) -> MultiLabelResult:
    assert isinstance(result.result, MultiLabelResult)
    return result.result


def points(result: ImageResult) -> PointsResult:
    assert isinstance(result.result, PointsResult)
    return result.result


def names(scores: list[LabelScore]) -> list[str]:
    return [item.label for item in scores]


PETS = ["abyssinian", "beagle", "chihuahua", "dachshund"]
VOC = ["cat", "dog", "car"]


# classification


def test_top_k_defaults_to_the_config_and_is_best_first() -> None:
    result = predict(config("classification", PETS, top_k=2), [[0.1, 0.6, 0.2, 0.1]])
    top = classification(result).top
    assert names(top) == ["beagle", "chihuahua"]
    assert top[0].score == pytest.approx(0.6)
    assert (result.tta_applied, result.tta_views) == (False, 1)
    assert (result.original_width, result.original_height) == (200, 100)


def test_top_k_larger_than_the_labels_returns_all_with_ties_in_vocabulary_order() -> None:
    result = predict(
        config("classification", PETS), [[0.1, 0.6, 0.2, 0.1]], PredictionOptions(top_k=10)
    )
    assert names(classification(result).top) == ["beagle", "chihuahua", "abyssinian", "dachshund"]


def test_request_top_k_overrides_the_config() -> None:
    result = predict(
        config("classification", PETS, top_k=3), [[0.1, 0.6, 0.2, 0.1]], PredictionOptions(top_k=1)
    )
    assert names(classification(result).top) == ["beagle"]


def test_below_the_configured_min_confidence_is_none_of_the_known_classes() -> None:
    result = classification(
        predict(config("classification", PETS, min_confidence=0.7), [[0.1, 0.6, 0.2, 0.1]])
    )
    assert result.below_min_confidence
    assert result.min_confidence == 0.7
    assert names(result.top) == ["beagle", "chihuahua", "abyssinian", "dachshund"]


def test_top_score_equal_to_min_confidence_is_not_below_it() -> None:
    result = classification(
        predict(
            config("classification", PETS, min_confidence=0.9),
            [[0.1, 0.6, 0.2, 0.1]],
            PredictionOptions(min_confidence=float(np.float32(0.6))),
        )
    )
    assert not result.below_min_confidence
    assert result.min_confidence == pytest.approx(0.6)


def test_min_confidence_off_by_default() -> None:
    result = classification(predict(config("classification", PETS), [[0.25, 0.25, 0.25, 0.25]]))
    assert (result.below_min_confidence, result.min_confidence) == (False, 0.0)


# multilabel


def voc(**fields: Any) -> ModelConfig:
    defaults: dict[str, Any] = {"threshold": 0.5, "class_thresholds": {"car": 0.3}}
    return config("multilabel", VOC, **(defaults | fields))


def test_multilabel_uses_configured_global_and_per_class_thresholds_inclusive() -> None:
    result = multilabel(predict(voc(), [[0.5, 0.49, 0.3]]))
    assert result.labels == [
        LabelScore("cat", 0.5, 0.5),
        LabelScore("car", 0.30000001192092896, 0.3),
    ]
    assert result.all_scores == []


def test_multilabel_labels_come_best_first() -> None:
    result = multilabel(predict(voc(), [[0.6, 0.9, 0.8]]))
    assert names(result.labels) == ["dog", "car", "cat"]


def test_request_threshold_replaces_every_configured_threshold() -> None:
    result = multilabel(predict(voc(), [[0.5, 0.49, 0.3]], PredictionOptions(threshold=0.4)))
    assert names(result.labels) == ["cat", "dog"]
    assert [item.threshold for item in result.labels] == [0.4, 0.4]


def test_request_class_threshold_wins_over_request_and_config_thresholds() -> None:
    options = PredictionOptions(threshold=0.4, class_thresholds={"cat": 0.55, "car": 0.25})
    result = multilabel(predict(voc(), [[0.5, 0.49, 0.3]], options))
    assert [(item.label, item.threshold) for item in result.labels] == [
        ("dog", 0.4),
        ("car", 0.25),
    ]


def test_request_class_threshold_alone_keeps_other_configured_defaults() -> None:
    options = PredictionOptions(class_thresholds={"dog": 0.45})
    result = multilabel(predict(voc(), [[0.5, 0.49, 0.3]], options))
    assert [(item.label, item.threshold) for item in result.labels] == [
        ("cat", 0.5),
        ("dog", 0.45),
        ("car", 0.3),
    ]


def test_score_equal_to_a_float32_threshold_from_the_wire_is_included() -> None:
    # 0.7 is not exact in float32: the wire's threshold and the model's score both round.
    wire_threshold = float(np.float32(0.7))
    result = multilabel(
        predict(
            voc(), [[0.7, 0.7, 0.1]], PredictionOptions(class_thresholds={"dog": wire_threshold})
        )
    )
    assert names(result.labels) == ["cat", "dog"]


def test_configured_threshold_equal_to_the_float32_score_is_included() -> None:
    result = multilabel(predict(voc(threshold=0.7, class_thresholds={}), [[0.7, 0.6, 0.1]]))
    assert names(result.labels) == ["cat"]


def test_all_scores_in_vocabulary_order_with_their_thresholds() -> None:
    result = multilabel(predict(voc(), [[0.2, 0.9, 0.1]], PredictionOptions(all_scores=True)))
    assert [(item.label, item.threshold) for item in result.all_scores] == [
        ("cat", 0.5),
        ("dog", 0.5),
        ("car", 0.3),
    ]
    assert [item.score for item in result.all_scores] == pytest.approx([0.2, 0.9, 0.1])
    assert names(result.labels) == ["dog"]


def test_nothing_above_threshold_gives_an_empty_multilabel_result() -> None:
    assert multilabel(predict(voc(), [[0.1, 0.2, 0.29]])).labels == []


# test-time augmentation


def tta(enabled: bool = True, views: list[str] | None = None, **fields: Any) -> dict[str, Any]:
    return {"enabled": enabled, "views": views or ["flip", "zoom_center"], **fields}


def test_tta_blend_is_lerp_of_augmented_mean_towards_plain_by_beta() -> None:
    model = config("classification", ["a", "b"], tta=tta())
    result = predict(model, [[0.9, 0.1], [0.3, 0.7], [0.5, 0.5]])
    # aug mean = (0.4, 0.6); 0.75 * aug + 0.25 * plain = (0.525, 0.475)
    top = classification(result).top
    assert names(top) == ["a", "b"]
    assert [item.score for item in top] == pytest.approx([0.525, 0.475])
    assert (result.tta_applied, result.tta_views) == (True, 3)


def test_tta_blend_uses_the_configured_beta() -> None:
    model = config("multilabel", ["a", "b"], tta=tta(views=["flip"], beta=0.5))
    result = multilabel(
        predict(model, [[0.9, 0.1], [0.3, 0.7]], PredictionOptions(all_scores=True))
    )
    assert [item.score for item in result.all_scores] == pytest.approx([0.6, 0.4])


def test_tta_can_be_asked_for_per_request_with_fewer_views() -> None:
    model = config("classification", ["a", "b"], tta=tta(enabled=False))
    resolved = resolve_options(model, PredictionOptions(tta=True, tta_views=1))
    assert [view.name for view in resolved.views] == ["identity", "flip"]
    assert resolved.tta_applied
    result = predict(model, [[0.9, 0.1], [0.3, 0.7]], PredictionOptions(tta=True, tta_views=1))
    assert classification(result).top[0].score == pytest.approx(0.55)
    assert result.tta_views == 2


def test_tta_can_be_switched_off_per_request() -> None:
    model = config("classification", ["a", "b"], tta=tta())
    result = predict(model, [[0.9, 0.1]], PredictionOptions(tta=False))
    assert (result.tta_applied, result.tta_views) == (False, 1)
    assert classification(result).top[0].score == pytest.approx(0.9)


def test_configured_views_resolve_identity_first_with_the_configured_zoom() -> None:
    model = config("points", ["head"], tta=tta(views=["flip+zoom_tl", "zoom_br"], zoom=1.25))
    views = resolve_options(model, PredictionOptions()).views
    assert [(v.name, v.flip, v.zoom, v.anchor) for v in views] == [
        ("identity", False, 1.0, (0.5, 0.5)),
        ("flip+zoom_tl", True, 1.25, (0.0, 0.0)),
        ("zoom_br", False, 1.25, (1.0, 1.0)),
    ]


# points


def test_points_without_tta_map_to_original_pixels() -> None:
    # 200x100 centre-cropped to 100x100 at x=50, scaled 2x to the 50x50 input.
    model = config("points", ["head", "chin"])
    result = points(predict(model, [[0.0, 0.0, -1.0, 1.0]]))
    assert [p.name for p in result.points] == ["head", "chin"]
    assert [c for p in result.points for c in (p.x, p.y)] == pytest.approx([100, 50, 50, 100])
    normalized = [c for p in result.points for c in (p.x_normalized, p.y_normalized)]
    assert normalized == pytest.approx([0, 0, -1, 1])


def test_points_tta_maps_each_view_back_before_blending() -> None:
    model = config("points", ["head"], tta=tta(views=["flip", "zoom_tl"], zoom=1.25))
    # identity: input (25, 25)   -> original (50 + 2 * 25, 2 * 25)        = (100, 50)
    # flip:     input (30, 25)   -> original (50 + 2 * (50 - 30), 50)     = (90, 50)
    # zoom_tl:  box 80x80 at (50, 0), scale 1.6:
    #           input (12.5, 37.5) -> original (50 + 1.6 * 12.5, 1.6 * 37.5) = (70, 60)
    # blend: 0.75 * mean((90, 50), (70, 60)) + 0.25 * (100, 50) = (85, 53.75)
    result = predict(model, [[0.0, 0.0], [0.2, 0.0], [-0.5, 0.5]])
    (head,) = points(result).points
    assert (head.x, head.y) == pytest.approx((85.0, 53.75))
    # identity frame: input ((85 - 50) / 2, 53.75 / 2) = (17.5, 26.875) of 50
    assert (head.x_normalized, head.y_normalized) == pytest.approx((-0.3, 0.075))
    assert (result.tta_applied, result.tta_views) == (True, 3)


def test_a_mirror_consistent_points_model_gives_the_same_point_with_tta() -> None:
    # A model that sees the same head in a flipped view answers with the mirrored u.
    model = config("points", ["head"], tta=tta(views=["flip"]))
    plain = points(predict(model, [[0.3, -0.2]], PredictionOptions(tta=False))).points[0]
    blended = points(predict(model, [[0.3, -0.2], [-0.3, -0.2]])).points[0]
    assert (blended.x, blended.y) == pytest.approx((plain.x, plain.y))


# invalid options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (PredictionOptions(top_k=0), "options.top_k"),
        (PredictionOptions(threshold=-0.01), "options.threshold"),
        (PredictionOptions(threshold=1.5), "options.threshold"),
        (PredictionOptions(threshold=math.nan), "options.threshold"),
        (PredictionOptions(class_thresholds={"dog": 1.01}), "options.class_thresholds['dog']"),
        (PredictionOptions(class_thresholds={"dog": math.nan}), "options.class_thresholds['dog']"),
        (
            PredictionOptions(class_thresholds={"zebra": 0.5}),
            "options.class_thresholds['zebra']: unknown label",
        ),
        (PredictionOptions(min_confidence=-0.5), "options.min_confidence"),
        (PredictionOptions(min_confidence=math.inf), "options.min_confidence"),
        (PredictionOptions(min_confidence=math.nan), "options.min_confidence"),
        (PredictionOptions(tta=True, tta_views=0), "options.tta_views"),
        (PredictionOptions(tta=True, tta_views=3), "options.tta_views"),
    ],
)
def test_bad_options_are_invalid_input_naming_the_field(
    options: PredictionOptions, message: str
) -> None:
    model = config("multilabel", VOC, tta=tta())
    with pytest.raises(InvalidInput, match="^" + re.escape(message)):
        resolve_options(model, options)


def test_asking_for_tta_on_a_model_without_views_is_invalid_input() -> None:
    model = config("classification", PETS, tta={"views": []})
    with pytest.raises(InvalidInput, match=r"^options\.tta: "):
        resolve_options(model, PredictionOptions(tta=True))
    assert resolve_options(model, PredictionOptions(tta=False)).views[0].name == "identity"


def test_a_model_output_of_the_wrong_width_is_not_the_callers_fault() -> None:
    model = config("classification", PETS)
    resolved = resolve_options(model, PredictionOptions())
    with pytest.raises(ValueError, match="returned shape"):
        finish(model, resolved, np.zeros((1, 3), np.float32), geometries(model, resolved, (8, 8)))
