"""One access-log line per call through a real server, the request id round trip, and
client-chosen text that cannot forge a line or overflow an error trailer."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.server import RunningServer, running_server, server_in_thread
from tests.server.support import encoded_request, png, solid
from visionrpc.client import Client, ModelNotFoundError
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.server.logging_setup import ACCESS_LOGGER, TextFormatter

RED = png(solid(255, 0, 0))
GARBAGE = b"not an image"
REQUEST_ID = "x-request-id"
PREDICT = "/visionrpc.v1.InferenceService/Predict"
# Metadata values are visible ASCII and spaces; this one is long.
LONG_ID = "a caller's id " * 40
FIELDS = ("method", "model", "version", "images", "failed_images", "status", "request_id")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_channel_mean_classifier(root, "colors")
    return root


@pytest.fixture
async def served(
    repository: Path, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[tuple[RunningServer, grpc.aio.Channel]]:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    async with (
        running_server(repository) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        yield server, channel


@pytest.fixture
def stub(served: tuple[RunningServer, grpc.aio.Channel]) -> pb_grpc.InferenceServiceAsyncStub:
    return pb_grpc.InferenceServiceStub(served[1])


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == ACCESS_LOGGER]


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [
        {name: record.__dict__[name] for name in FIELDS if name in record.__dict__}
        for record in access_records(caplog)
    ]


def trailing_ids(metadata: Any) -> list[str]:
    return [value for key, value in metadata or () if key == REQUEST_ID]


async def test_a_prediction_logs_one_line_and_returns_the_callers_id_in_the_trailer(
    stub: pb_grpc.InferenceServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    request = encoded_request("colors", RED, GARBAGE, RED)
    call = stub.Predict(request, metadata=((REQUEST_ID, "abc-123"),))
    await call
    assert trailing_ids(await call.trailing_metadata()) == ["abc-123"]
    # Initial metadata would commit the call, so the client could no longer retry it.
    assert trailing_ids(await call.initial_metadata()) == []
    assert access_lines(caplog) == [
        {
            "method": PREDICT,
            "model": "colors",
            "version": "1",
            "images": 3,
            "failed_images": 1,
            "status": "OK",
            "request_id": "abc-123",
        }
    ]
    latency = access_records(caplog)[0].__dict__["latency_ms"]
    assert isinstance(latency, float) and latency > 0.0


async def test_a_failed_request_logs_its_status_and_still_returns_the_id(
    stub: pb_grpc.InferenceServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Predict(encoded_request("nope", RED, RED), metadata=((REQUEST_ID, "req-9"),))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert trailing_ids(failure.value.trailing_metadata()) == ["req-9"]
    assert access_lines(caplog) == [
        {
            "method": PREDICT,
            "model": "nope",
            "version": "",
            "images": 2,
            "failed_images": 2,
            "status": "NOT_FOUND",
            "request_id": "req-9",
        }
    ]


async def test_without_an_id_the_server_makes_one_and_sends_it_back(
    stub: pb_grpc.InferenceServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    call = stub.Predict(encoded_request("colors", RED))
    await call
    [echoed] = trailing_ids(await call.trailing_metadata())
    assert re.fullmatch(r"[0-9a-f]{32}", echoed)
    assert [line["request_id"] for line in access_lines(caplog)] == [echoed]


async def test_a_stream_logs_one_line_for_all_its_requests(
    stub: pb_grpc.InferenceServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    requests = [
        encoded_request("colors", RED, request_id="a"),
        encoded_request("colors", RED, GARBAGE, request_id="b"),
        encoded_request("nope", RED, request_id="c"),
    ]
    call = stub.PredictStream(iter(requests), metadata=((REQUEST_ID, "stream-1"),))
    answers = [answer async for answer in call]
    assert sorted(answer.request_id for answer in answers) == ["a", "b", "c"]
    assert trailing_ids(await call.trailing_metadata()) == ["stream-1"]
    [line] = access_records(caplog)
    assert line.__dict__["method"] == "/visionrpc.v1.InferenceService/PredictStream"
    assert line.__dict__["status"] == "OK"
    assert line.__dict__["request_id"] == "stream-1"
    assert line.__dict__["requests"] == 3
    assert line.__dict__["images"] == 4
    # The undecodable image, and the one of the request for an unknown model.
    assert line.__dict__["failed_images"] == 2


async def test_every_rpc_logs_a_line_health_and_model_listing_included(
    served: tuple[RunningServer, grpc.aio.Channel], caplog: pytest.LogCaptureFixture
) -> None:
    _, channel = served
    stub = pb_grpc.InferenceServiceStub(channel)
    await stub.ListModels(pb.ListModelsRequest(), metadata=((REQUEST_ID, "list"),))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetModelInfo(pb.GetModelInfoRequest(model="nope"))
    health = health_pb2_grpc.HealthStub(channel)
    await health.Check(health_pb2.HealthCheckRequest(service=""))
    lines = [(line["method"], line["status"]) for line in access_lines(caplog)]
    assert lines == [
        ("/visionrpc.v1.InferenceService/ListModels", "OK"),
        ("/visionrpc.v1.InferenceService/GetModelInfo", "NOT_FOUND"),
        ("/grpc.health.v1.Health/Check", "OK"),
    ]
    assert access_lines(caplog)[0]["request_id"] == "list"


async def test_concurrent_calls_each_log_their_own_request_id(
    stub: pb_grpc.InferenceServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    ids = [f"concurrent-{n}" for n in range(16)]
    await asyncio.gather(
        *(
            stub.Predict(encoded_request("colors", RED), metadata=((REQUEST_ID, request_id),))
            for request_id in ids
        )
    )
    assert sorted(str(line["request_id"]) for line in access_lines(caplog)) == sorted(ids)


async def test_control_characters_a_caller_sends_cannot_forge_a_text_log_line(
    stub: pb_grpc.InferenceServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    forged = "nope\n2026-01-01 00:00:00 INFO visionrpc.access: call status=OK\x1b[2J"
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Predict(encoded_request(forged, RED), metadata=((REQUEST_ID, LONG_ID),))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    details = failure.value.details() or ""
    assert "\n" not in details and "\x1b" not in details and "nope\\n2026" in details
    [record] = access_records(caplog)
    text = TextFormatter().format(record)
    assert "\n" not in text and "\x1b" not in text
    assert "nope\\x0a2026" in text
    # A caller's id is cut too, in the log line and in the trailer.
    assert record.__dict__["request_id"] == LONG_ID[:128]
    assert trailing_ids(failure.value.trailing_metadata()) == [LONG_ID[:128]]


def test_a_20_kb_model_name_gives_a_short_not_found_the_client_reports(
    repository: Path,
) -> None:
    huge = "m" * 20_000
    with server_in_thread(repository) as server, Client(server.address) as client:
        with pytest.raises(ModelNotFoundError) as failure:
            client.predict(huge, [RED], timeout=10)
        with pytest.raises(ModelNotFoundError):
            client.model_info(huge, timeout=10)
    assert len(str(failure.value)) < 1000
    assert "more characters" in str(failure.value)


async def test_a_method_nobody_registered_is_neither_counted_nor_logged(
    served: tuple[RunningServer, grpc.aio.Channel], caplog: pytest.LogCaptureFixture
) -> None:
    server, channel = served
    # Raw bytes: the stubs know only the registered methods.
    made_up: Any = channel.unary_unary("/visionrpc.v1.InferenceService/Scan0001")  # type: ignore[call-arg]
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await made_up(b"")
    assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED
    methods = {
        sample.labels.get("grpc_method")
        for family in server.metrics.registry.collect()
        for sample in family.samples
    }
    assert "Scan0001" not in methods
    assert "Predict" in methods
    assert access_records(caplog) == []
