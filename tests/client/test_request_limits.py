"""Lists longer than a model's max images per request are split by the client, transparently.

A real server with a small ``max_images_per_request``; requests are counted at the server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.client.conftest import NEWEST_TEMPERATURE, random_images
from tests.helpers.onnx_models import channel_mean_scores
from tests.helpers.server import RunningServer, server_in_thread
from visionrpc.client import Classification, Client, ImageError, ImageInput, Prediction
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc

LIMIT = 3
LABELS = ("red", "green", "blue")


@pytest.fixture(scope="module")
def limited(repository: Path) -> Iterator[RunningServer]:
    with server_in_thread(repository, max_images_per_request=LIMIT) as running:
        yield running


def answered_requests(server: RunningServer) -> float:
    """Predict requests (unary or streamed) the server answered for colors v2."""
    labels = {"model": "colors", "version": "2", "code": "OK"}
    return server.metrics.registry.get_sample_value("visionrpc_requests_total", labels) or 0.0


def assert_scores(results: list[Prediction], images: list[np.ndarray]) -> None:
    expected = channel_mean_scores(np.stack(images), NEWEST_TEMPERATURE)
    assert len(results) == len(images)
    for result, want in zip(results, expected, strict=True):
        assert isinstance(result, Classification), result
        scores = {entry.label: entry.score for entry in result.top}
        assert [scores[label] for label in LABELS] == pytest.approx(want.tolist(), abs=1e-5)


def test_the_server_refuses_more_images_than_its_limit_naming_it(limited: RunningServer) -> None:
    request = pb.PredictRequest(
        model="colors",
        images=[pb.Image(encoded=b"x") for _ in range(LIMIT + 1)],
    )
    with grpc.insecure_channel(limited.address) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.InferenceServiceStub(channel).Predict(request, timeout=10)
    error = caught.value
    assert isinstance(error, grpc.Call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_images_per_request" in (error.details() or "")


def test_predict_splits_a_long_list_and_answers_every_input_in_order(
    limited: RunningServer,
) -> None:
    images = random_images(8, seed=5)
    with Client(limited.address, timeout=20) as client:
        assert client.model_info("colors").max_images_per_request == LIMIT
        before = answered_requests(limited)
        results = client.predict("colors", images, top_k=3)
        assert answered_requests(limited) - before == 3  # 3 + 3 + 2 images
    assert_scores(results, images)


def test_predict_many_caps_its_batches_at_the_limit(limited: RunningServer) -> None:
    images = random_images(10, seed=6)
    with Client(limited.address, timeout=20) as client:
        before = answered_requests(limited)
        results = client.predict_many("colors", images, batch_size=16, top_k=3)
        assert answered_requests(limited) - before == 4  # 3 + 3 + 3 + 1 images
    assert_scores(results, images)


def test_a_failure_in_a_later_request_keeps_its_callers_index(limited: RunningServer) -> None:
    images: list[ImageInput] = [*random_images(8, seed=7)]
    images[7] = b"GIF89a, then nothing an image needs"
    with Client(limited.address, timeout=20) as client:
        results = client.predict("colors", images)
    failed = results[7]
    assert isinstance(failed, ImageError)
    assert (failed.index, failed.message[:8]) == (7, "image 7:")
    assert all(isinstance(result, Classification) for result in results[:7])
