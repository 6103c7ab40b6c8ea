"""One access-log line per request through a real server, and the request id round trip."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.server import running_server
from tests.server.support import encoded_request, png, solid
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.server.logging_setup import ACCESS_LOGGER

RED = png(solid(255, 0, 0))
REQUEST_ID = "x-request-id"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_channel_mean_classifier(root, "colors")
    return root


@pytest.fixture
async def stub(
    repository: Path, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[pb_grpc.InferenceServiceAsyncStub]:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    async with (
        running_server(repository) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        yield pb_grpc.InferenceServiceStub(channel)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    fields = ("model", "version", "images", "status", "request_id")
    return [
        {name: getattr(record, name) for name in fields}
        for record in caplog.records
        if record.name == ACCESS_LOGGER
    ]


async def test_a_request_logs_one_line_and_echoes_the_callers_id(
    stub: pb_grpc.InferenceServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    call = stub.Predict(encoded_request("colors", RED, RED), metadata=((REQUEST_ID, "abc-123"),))
    await call
    # Trailing only: initial metadata would commit the call before its outcome.
    assert tuple(await call.initial_metadata()) == ()
    assert (REQUEST_ID, "abc-123") in tuple(await call.trailing_metadata())
    assert access_lines(caplog) == [
        {"model": "colors", "version": "1", "images": 2, "status": "OK", "request_id": "abc-123"}
    ]
    latency = next(r for r in caplog.records if r.name == ACCESS_LOGGER).__dict__["latency_ms"]
    assert isinstance(latency, float) and latency > 0.0


async def test_a_failed_request_logs_its_status_and_still_echoes_the_id(
    stub: pb_grpc.InferenceServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Predict(encoded_request("nope", RED), metadata=((REQUEST_ID, "req-9"),))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    trailing: list[object] = list(failure.value.trailing_metadata() or ())
    assert (REQUEST_ID, "req-9") in trailing
    assert access_lines(caplog) == [
        {"model": "nope", "version": "", "images": 1, "status": "NOT_FOUND", "request_id": "req-9"}
    ]


async def test_without_an_id_the_server_makes_one_and_sends_it_back(
    stub: pb_grpc.InferenceServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    call = stub.Predict(encoded_request("colors", RED))
    await call
    echoed = dict(tuple(await call.trailing_metadata()))[REQUEST_ID]
    assert isinstance(echoed, str) and re.fullmatch(r"[0-9a-f]{32}", echoed)
    assert [line["request_id"] for line in access_lines(caplog)] == [echoed]


async def test_a_stream_logs_each_request_under_the_streams_id(
    stub: pb_grpc.InferenceServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    requests = [encoded_request("colors", RED, request_id=str(n)) for n in range(3)]
    call = stub.PredictStream(iter(requests), metadata=((REQUEST_ID, "stream-1"),))
    answers = [answer async for answer in call]
    assert len(answers) == 3
    assert (REQUEST_ID, "stream-1") in tuple(await call.trailing_metadata())
    lines = access_lines(caplog)
    assert [line["request_id"] for line in lines] == ["stream-1"] * 3
    assert {line["status"] for line in lines} == {"OK"}
