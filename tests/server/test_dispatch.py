"""When batches start, through a real server: at once on an idle model, bigger under load."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.server import running_server
from tests.server.support import encoded_request, png, solid
from visionrpc.protos import inference_pb2_grpc as pb_grpc

HOUR_MS = 3_600_000


async def test_an_idle_server_answers_a_lone_request_without_waiting_out_the_delay(
    tmp_path: Path,
) -> None:
    root = tmp_path / "models"
    write_channel_mean_classifier(root, batching={"max_queue_delay_ms": HOUR_MS})
    async with (
        running_server(root) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        for colour, label in (((255, 0, 0), "red"), ((0, 0, 255), "blue")):
            # A timeout far under the hour: only an idle dispatch answers in time.
            response = await stub.Predict(
                encoded_request("colors", png(solid(*colour))), timeout=30
            )
            assert response.results[0].classification.top[0].label == label
        stats = server.repository.get("colors").batcher.stats
        assert (stats.runs, stats.rows_run, stats.largest_batch) == (2, 2, 1)


async def test_concurrent_requests_share_batches_though_the_delay_never_closes_one(
    tmp_path: Path,
) -> None:
    root = tmp_path / "models"
    write_channel_mean_classifier(
        root, batching={"max_queue_delay_ms": HOUR_MS, "max_batch_size": 64}
    )
    requests = 40
    async with (
        running_server(root) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        image = png(solid(0, 255, 0))
        answers = await asyncio.gather(
            *(stub.Predict(encoded_request("colors", image), timeout=60) for _ in range(requests))
        )
        assert {a.results[0].classification.top[0].label for a in answers} == {"green"}
        stats = server.repository.get("colors").batcher.stats
    # Every row ran; the ones that came while a batch ran waited and went together.
    assert stats.rows_run == requests
    assert stats.runs < requests
    assert stats.largest_batch > 1
