"""PredictStream: one answer per request, matched by request_id; failures stay per request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np

from tests.helpers.onnx_models import channel_means, write_channel_mean_multilabel
from tests.helpers.server import running_server
from tests.server.support import encoded_request, png, solid
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc


async def test_every_request_is_answered_once_even_after_a_bad_one(
    analytic_repository: Path,
) -> None:
    levels = list(range(0, 250, 10))
    options = pb.PredictionOptions(all_scores=True)
    requests = [
        encoded_request(
            "channels", png(solid(level, 255 - level, 7)), request_id=f"r{level}", options=options
        )
        for level in levels
    ]
    # A bad request in the middle: an unknown model, and one with no images.
    requests.insert(5, encoded_request("nope", png(solid(1, 1, 1)), request_id="unknown"))
    requests.insert(9, pb.PredictRequest(model="channels", request_id="empty"))

    async def outgoing() -> AsyncIterator[pb.PredictRequest]:
        for request in requests:
            yield request

    async with (
        running_server(analytic_repository, stream_max_in_flight=4) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        answers = [answer async for answer in stub.PredictStream(outgoing())]

    by_id = {answer.request_id: answer for answer in answers}
    assert len(answers) == len(requests) == len(by_id)
    assert by_id["unknown"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "'nope'" in by_id["unknown"].error.message
    assert by_id["empty"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not by_id["unknown"].results
    for level in levels:
        answer = by_id[f"r{level}"]
        assert not answer.HasField("error")
        assert (answer.model, answer.version, answer.task) == (
            "channels",
            "1",
            pb.MODEL_TASK_MULTILABEL,
        )
        expected = channel_means(solid(level, 255 - level, 7)[None])[0]
        served = [item.score for item in answer.results[0].multilabel.all_scores]
        np.testing.assert_allclose(served, expected, atol=1e-6)


async def test_an_empty_stream_ends_cleanly(analytic_repository: Path) -> None:
    async def nothing() -> AsyncIterator[pb.PredictRequest]:
        requests: list[pb.PredictRequest] = []
        for request in requests:
            yield request

    async with (
        running_server(analytic_repository) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        assert [answer async for answer in stub.PredictStream(nothing())] == []


async def test_a_stream_works_on_requests_concurrently_up_to_its_bound(tmp_path: Path) -> None:
    root = tmp_path / "models"
    # The long delay lets every request that is in flight join the first batch.
    write_channel_mean_multilabel(
        root, batching={"max_queue_delay_ms": 800, "max_batch_size": 16, "wait_when_idle": True}
    )

    async def outgoing() -> AsyncIterator[pb.PredictRequest]:
        for index in range(8):
            yield encoded_request("channels", png(solid(index, 0, 0)), request_id=str(index))

    async with (
        running_server(root, stream_max_in_flight=4) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        answers = [answer async for answer in stub.PredictStream(outgoing())]
        stats = server.repository.get("channels").batcher.stats
    assert sorted(int(answer.request_id) for answer in answers) == list(range(8))
    assert (stats.runs, stats.largest_batch) == (2, 4)
