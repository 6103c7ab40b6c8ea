"""Predict through a real server: every answer checked against the analytic models' numpy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.helpers.onnx_models import (
    centroid_points,
    channel_mean_scores,
    channel_means,
    write_channel_mean_classifier,
)
from tests.helpers.server import running_server
from tests.server.support import encoded_request, model_input, png, random_image, solid
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.server.model_config import InputSpec
from visionrpc.server.pipeline import SMALL_IMAGE_BYTES, SMALL_IMAGE_PIXELS
from visionrpc.server.preprocess import load_image, parse_view, prepare

LABELS = ("red", "green", "blue")


@pytest.fixture
async def stub(analytic_repository: Path) -> AsyncIterator[pb_grpc.InferenceServiceAsyncStub]:
    async with (
        running_server(
            analytic_repository, max_image_bytes=4000, max_image_pixels=10_000
        ) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        yield pb_grpc.InferenceServiceStub(channel)


def top_as_dict(result: pb.ImageResult) -> dict[str, float]:
    return {item.label: item.score for item in result.classification.top}


async def test_classification_scores_equal_the_reference(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    rng = np.random.default_rng(1)
    files = [png(random_image(rng, w, h)) for w, h in ((8, 8), (20, 11), (5, 30))]
    files.append(png(solid(250, 10, 10)))
    response = await stub.Predict(encoded_request("colors", *files))
    assert (response.model, response.version, response.task) == (
        "colors",
        "1",
        pb.MODEL_TASK_CLASSIFICATION,
    )
    assert len(response.results) == len(files)
    for data, result in zip(files, response.results, strict=True):
        row, _ = model_input(data)
        expected = channel_mean_scores(row[None])[0]
        scores = top_as_dict(result)
        assert list(scores) == [LABELS[i] for i in np.argsort(-expected, kind="stable")]
        np.testing.assert_allclose([scores[label] for label in LABELS], expected, atol=1e-6)
        assert not result.tta_applied and result.tta_views == 1
    assert response.results[3].classification.top[0].label == "red"
    assert (response.results[1].original_width, response.results[1].original_height) == (20, 11)


async def test_top_k_limits_the_labels_returned(stub: pb_grpc.InferenceServiceAsyncStub) -> None:
    request = encoded_request(
        "colors", png(solid(10, 10, 240)), options=pb.PredictionOptions(top_k=1)
    )
    response = await stub.Predict(request)
    assert [item.label for item in response.results[0].classification.top] == ["blue"]


async def test_min_confidence_flags_an_unsure_answer(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    grey = png(solid(128, 128, 128))
    options = pb.PredictionOptions(min_confidence=0.5)
    result = (await stub.Predict(encoded_request("colors", grey, options=options))).results[0]
    assert result.classification.below_min_confidence
    assert result.classification.min_confidence == pytest.approx(0.5)


async def test_multilabel_scores_are_the_channel_means(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    image = solid(204, 51, 153)  # 0.8, 0.2, 0.6 of full scale
    request = encoded_request("channels", png(image), options=pb.PredictionOptions(all_scores=True))
    result = (await stub.Predict(request)).results[0].multilabel
    assert [(item.label, item.threshold) for item in result.labels] == [
        ("red", 0.5),
        ("blue", 0.5),
    ]
    expected = channel_means(image[None])[0]
    np.testing.assert_allclose([item.score for item in result.all_scores], expected, atol=1e-6)
    assert [item.label for item in result.all_scores] == list(LABELS)


async def test_multilabel_request_thresholds_apply(stub: pb_grpc.InferenceServiceAsyncStub) -> None:
    options = pb.PredictionOptions(threshold=0.1, class_thresholds={"red": 0.9})
    request = encoded_request("channels", png(solid(204, 51, 153)), options=options)
    result = (await stub.Predict(request)).results[0].multilabel
    assert [(item.label, round(item.threshold, 6)) for item in result.labels] == [
        ("blue", 0.1),
        ("green", 0.1),
    ]


async def test_points_come_back_in_original_pixels(stub: pb_grpc.InferenceServiceAsyncStub) -> None:
    image = np.zeros((12, 24, 3), dtype=np.uint8)
    image[2:5, 15:19] = 255
    data = png(image)
    result = (await stub.Predict(encoded_request("centroid", data))).results[0]
    row, geometry = model_input(data)
    u, v = centroid_points(row[None])[0]
    expected_x, expected_y = geometry.normalized_to_original(float(u), float(v))
    (point,) = result.points.points
    assert point.name == "bright"
    assert (point.x_normalized, point.y_normalized) == pytest.approx((u, v), abs=1e-5)
    assert (point.x, point.y) == pytest.approx((expected_x, expected_y), abs=1e-4)
    assert 15 < point.x < 19 and 2 < point.y < 5


async def test_tta_views_are_batched_and_blended(stub: pb_grpc.InferenceServiceAsyncStub) -> None:
    rng = np.random.default_rng(2)
    data = png(random_image(rng, 16, 16))
    request = encoded_request("colors", data, options=pb.PredictionOptions(tta=True))
    result = (await stub.Predict(request)).results[0]
    spec = InputSpec(height=8, width=8, resize_method="squish")
    image = load_image(data)
    plain = channel_mean_scores(prepare(image, spec)[0][None])[0].astype(np.float64)
    flipped = prepare(image, spec, parse_view("flip", zoom=1.15))[0]
    augmented = channel_mean_scores(flipped[None])[0].astype(np.float64)
    expected = 0.75 * augmented + 0.25 * plain
    assert result.tta_applied and result.tta_views == 2
    scores = top_as_dict(result)
    np.testing.assert_allclose([scores[label] for label in LABELS], expected, atol=1e-6)


async def test_raw_pixels_of_one_three_and_four_channels(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    grey = np.full((8, 8, 1), 102, dtype=np.uint8)
    rgb = solid(0, 255, 51)
    rgba = np.concatenate([solid(255, 0, 0), np.full((8, 8, 1), 255, np.uint8)], axis=2)
    images = [
        pb.Image(raw=pb.RawImage(pixels=a.tobytes(), height=8, width=8, channels=a.shape[2]))
        for a in (grey, rgb, rgba)
    ]
    request = pb.PredictRequest(
        model="channels", images=images, options=pb.PredictionOptions(all_scores=True)
    )
    response = await stub.Predict(request)
    expected = [[0.4, 0.4, 0.4], [0.0, 1.0, 0.2], [1.0, 0.0, 0.0]]
    for result, want in zip(response.results, expected, strict=True):
        np.testing.assert_allclose([s.score for s in result.multilabel.all_scores], want, atol=1e-6)


async def test_bad_images_fail_alone_and_name_their_index(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    good = png(solid(240, 20, 20))
    noisy = png(random_image(np.random.default_rng(3), 64, 64))  # over 4000 bytes
    huge = png(solid(0, 0, 0, width=200, height=100))  # 20 000 pixels, small file
    images = [
        pb.Image(encoded=good),
        pb.Image(encoded=b""),
        pb.Image(encoded=good[: len(good) // 2]),
        pb.Image(encoded=b"GIF89a but not really an image"),
        pb.Image(encoded=noisy),
        pb.Image(encoded=huge),
        pb.Image(raw=pb.RawImage(pixels=b"\x00" * 10, height=2, width=2, channels=3)),
        pb.Image(raw=pb.RawImage(pixels=b"\x00" * 8, height=2, width=2, channels=2)),
        pb.Image(encoded=good),
    ]
    response = await stub.Predict(pb.PredictRequest(model="colors", images=images))
    reasons = {
        1: "empty",
        2: "data cannot be decoded",
        3: "the GIF data cannot be decoded",
        4: "over the limit of 4000",
        5: "over the limit of 10000",
        6: "needs 12 bytes",
        7: "1, 3 or 4 channels",
    }
    for index, reason in reasons.items():
        error = response.results[index].error
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert error.message.startswith(f"image {index}: ")
        assert reason in error.message
    for index in (0, 8):
        assert response.results[index].WhichOneof("result") == "classification"
        assert response.results[index].classification.top[0].label == "red"


async def test_a_request_without_images_is_invalid(stub: pb_grpc.InferenceServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Predict(pb.PredictRequest(model="colors"))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no images" in (failure.value.details() or "")


async def test_a_bad_option_is_invalid_and_named(stub: pb_grpc.InferenceServiceAsyncStub) -> None:
    request = encoded_request(
        "channels", png(solid(1, 2, 3)), options=pb.PredictionOptions(threshold=1.5)
    )
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Predict(request)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "options.threshold" in (failure.value.details() or "")


async def test_an_unknown_model_is_not_found_and_lists_the_models(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Predict(encoded_request("colours", png(solid(1, 2, 3))))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    details = failure.value.details() or ""
    assert "'colours'" in details
    assert all(name in details for name in ("centroid", "channels", "colors"))


async def test_newest_version_by_default_and_an_older_one_when_pinned(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_channel_mean_classifier(root, temperature=10.0)
    write_channel_mean_classifier(root, temperature=2.0, version_policy={"all": {}})
    data = png(random_image(np.random.default_rng(4), 8, 8))
    row, _ = model_input(data)
    async with (
        running_server(root) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        for version, temperature in (("", 2.0), ("2", 2.0), ("1", 10.0)):
            response = await stub.Predict(encoded_request("colors", data, version=version))
            assert response.version == (version or "2")
            scores = top_as_dict(response.results[0])
            expected = channel_mean_scores(row[None], temperature)[0]
            np.testing.assert_allclose([scores[label] for label in LABELS], expected, atol=1e-6)
        for missing in ("3", "latest"):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await stub.Predict(encoded_request("colors", data, version=missing))
            assert failure.value.code() == grpc.StatusCode.NOT_FOUND
            assert "versions: 1, 2" in (failure.value.details() or "")


async def test_small_images_do_not_wait_behind_photos_being_decoded(tmp_path: Path) -> None:
    """Small images have a decode thread of their own; photos of many pixels never take it,
    even when their files are small enough (the lane reads the header's size first)."""
    root = tmp_path / "models"
    write_channel_mean_classifier(root)
    y, x = np.mgrid[0:4000, 0:4000]
    slow = png(np.stack([x // 16, y // 16, (x + y) // 32], -1).astype(np.uint8))
    assert len(slow) <= SMALL_IMAGE_BYTES and SMALL_IMAGE_PIXELS < 4000 * 4000
    pixels = solid(10, 250, 10)
    finished: list[str] = []
    async with (
        running_server(root, preprocess_workers=1) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)

        async def call(name: str, data: bytes) -> pb.PredictResponse:
            response = await stub.Predict(encoded_request("colors", data))
            finished.append(name)
            return response

        photos = [asyncio.create_task(call(f"photo {i}", slow)) for i in range(3)]
        # Had they taken the small lane, the thumbnail would wait ~0.5 s behind them there.
        await asyncio.sleep(0.05)
        answer = await call("thumbnail", png(pixels))
        await asyncio.gather(*photos)
    assert finished[0] == "thumbnail", finished
    assert answer.results[0].classification.top[0].label == "green"


async def test_raw_pixels_at_the_input_size_do_not_wait_behind_photos_being_decoded(
    tmp_path: Path,
) -> None:
    """Such rows are copies of the request's bytes, made on the event loop at once."""
    root = tmp_path / "models"
    write_channel_mean_classifier(root)
    y, x = np.mgrid[0:4000, 0:4000]
    # 16 MP that compress to a small PNG but take the one decode thread ~0.2 s each.
    slow = png(np.stack([x // 16, y // 16, (x + y) // 32], -1).astype(np.uint8))
    pixels = solid(250, 10, 10)
    raw = pb.Image(raw=pb.RawImage(pixels=pixels.tobytes(), height=8, width=8, channels=3))
    finished: list[str] = []
    async with (
        running_server(root, preprocess_workers=1) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)

        async def call(name: str, request: pb.PredictRequest) -> pb.PredictResponse:
            response = await stub.Predict(request)
            finished.append(name)
            return response

        photos = [
            asyncio.create_task(call(f"photo {i}", encoded_request("colors", slow)))
            for i in range(3)
        ]
        # Time for the photos to arrive: decoding them then holds the thread for ~0.5 s.
        await asyncio.sleep(0.05)
        answer = await call("raw", pb.PredictRequest(model="colors", images=[raw]))
        await asyncio.gather(*photos)
    assert finished[0] == "raw", finished
    expected = channel_mean_scores(pixels[None].astype(np.float32))[0]
    np.testing.assert_allclose(
        [top_as_dict(answer.results[0])[label] for label in LABELS], expected, atol=1e-6
    )
