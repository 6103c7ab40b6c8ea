"""Many clients at once, a full queue, and deadlines, through a real server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.server import running_server
from tests.server.support import encoded_request, model_input, png, random_image, solid
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.server.batching import Batcher

REQUESTS = 300
CLIENTS_AT_ONCE = 48


async def test_hundreds_of_concurrent_requests_each_get_their_own_exact_answer(
    analytic_repository: Path,
) -> None:
    rng = np.random.default_rng(5)
    requests: list[tuple[str, list[bytes]]] = []
    for index in range(REQUESTS):
        count = int(rng.integers(1, 4))
        files = [png(random_image(rng, *rng.integers(4, 24, size=2))) for _ in range(count)]
        requests.append(("channels" if index % 2 else "colors", files))
    sessions = {
        name: ort.InferenceSession(
            str(analytic_repository / name / "1" / "model.onnx"),
            providers=["CPUExecutionProvider"],
        )
        for name in ("colors", "channels")
    }

    def direct_run(model: str, data: bytes) -> np.ndarray:
        row, _ = model_input(data)
        output: np.ndarray = sessions[model].run(None, {"image": row[None]})[0][0]
        return output

    async with (
        running_server(analytic_repository, max_batch_size=8, max_queue_delay_ms=5.0) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        slots = asyncio.Semaphore(CLIENTS_AT_ONCE)
        # Each task refuses the options of the others.
        options = {
            "colors": pb.PredictionOptions(top_k=3),
            "channels": pb.PredictionOptions(all_scores=True, threshold=0.0),
        }

        async def call(model: str, files: list[bytes]) -> pb.PredictResponse:
            async with slots:
                response: pb.PredictResponse = await stub.Predict(
                    encoded_request(model, *files, options=options[model])
                )
                return response

        responses = await asyncio.gather(*(call(model, files) for model, files in requests))
        batchers = {name: server.repository.get(name).batcher for name in ("colors", "channels")}

    for (model, files), response in zip(requests, responses, strict=True):
        assert response.model == model
        assert len(response.results) == len(files)
        for data, result in zip(files, response.results, strict=True):
            expected = direct_run(model, data)
            if model == "colors":
                scores = {item.label: item.score for item in result.classification.top}
                served = [scores[label] for label in ("red", "green", "blue")]
            else:
                served = [item.score for item in result.multilabel.all_scores]
            np.testing.assert_allclose(served, expected, atol=1e-6)
    rows = {name: sum(len(f) for m, f in requests if m == name) for name in batchers}
    for name, batcher in batchers.items():
        assert batcher.stats.rows_run == rows[name]  # nothing lost, nothing run twice
        assert batcher.stats.largest_batch > 1
        assert batcher.stats.runs < rows[name]


async def wait_until_queued(batcher: Batcher, count: int) -> None:
    for _ in range(500):
        if batcher.queued == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{batcher.name}: {batcher.queued} queued, expected {count}")


async def test_a_full_queue_answers_resource_exhausted_at_once(tmp_path: Path) -> None:
    root = tmp_path / "models"
    # A long batching delay keeps the first rows waiting in the queue.
    write_channel_mean_classifier(
        root,
        batching={
            "max_queue_size": 2,
            "max_batch_size": 16,
            "max_queue_delay_ms": 1500,
            "wait_when_idle": True,
        },
    )
    image = png(solid(255, 0, 0))
    async with (
        running_server(root) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        batcher = server.repository.get("colors").batcher
        waiting = [asyncio.ensure_future(stub.Predict(encoded_request("colors", image)))]
        # More images than the queue can ever hold: the caller's mistake, not load.
        with pytest.raises(grpc.aio.AioRpcError) as too_big:
            await stub.Predict(encoded_request("colors", image, image, image))
        assert too_big.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_images_per_request" in (too_big.value.details() or "")
        waiting.append(asyncio.ensure_future(stub.Predict(encoded_request("colors", image))))
        await wait_until_queued(batcher, 2)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Predict(encoded_request("colors", image))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "overloaded" in (refused.value.details() or "")
        # Callers that give up free their slots; what they queued never runs.
        for call in waiting:
            call.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        response = await stub.Predict(encoded_request("colors", image))
        assert response.results[0].classification.top[0].label == "red"
        assert (batcher.stats.runs, batcher.stats.rows_run) == (1, 1)
        assert batcher.stats.dropped_cancelled == 2


async def test_a_request_past_its_deadline_is_dropped_before_compute(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_channel_mean_classifier(
        root, batching={"max_queue_delay_ms": 1500, "wait_when_idle": True}
    )
    image = png(solid(0, 0, 255))
    async with (
        running_server(root) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        batcher = server.repository.get("colors").batcher
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stub.Predict(encoded_request("colors", image), timeout=0.5)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        response = await stub.Predict(encoded_request("colors", image))
        assert response.results[0].classification.top[0].label == "blue"
        assert (batcher.stats.runs, batcher.stats.rows_run) == (1, 1)
        assert batcher.stats.dropped_cancelled + batcher.stats.dropped_expired == 1
