"""Log formats: JSON lines with the request fields, readable text, and a set-up that can be
called twice."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from visionrpc.server.interceptors import ObservabilityInterceptor
from visionrpc.server.logging_setup import (
    ACCESS_LOGGER,
    JsonFormatter,
    RequestIdFilter,
    TextFormatter,
    configure_logging,
    request_id,
    request_log,
)
from visionrpc.server.metrics import ServerMetrics


@pytest.fixture
def access_log() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger(f"{ACCESS_LOGGER}.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream, handler
    logger.removeHandler(handler)


@pytest.fixture
def request_id_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing JSON lines with the request id filter, as the server sets it up."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("visionrpc.test.request_id")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger, stream
    logger.removeHandler(handler)


def log_request(logger: logging.Logger) -> None:
    request_log(
        logger,
        method="/visionrpc.v1.InferenceService/Predict",
        status="OK",
        latency_seconds=0.0123456,
        request_id="req-17",
        model="pets",
        version="3",
        images=4,
        failed_images=1,
    )


def test_json_access_line_carries_every_request_field(
    access_log: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = access_log
    handler.setFormatter(JsonFormatter())
    log_request(logger)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    timestamp = entry.pop("timestamp")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", timestamp)
    assert entry == {
        "level": "INFO",
        "logger": f"{ACCESS_LOGGER}.test",
        "message": "call",
        "method": "/visionrpc.v1.InferenceService/Predict",
        "status": "OK",
        "latency_ms": 12.346,
        "request_id": "req-17",
        "model": "pets",
        "version": "3",
        "images": 4,
        "failed_images": 1,
    }


def test_json_line_includes_the_traceback_and_odd_extras(
    access_log: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = access_log
    handler.setFormatter(JsonFormatter())
    try:
        raise ValueError("bad tensor shape")
    except ValueError:
        logger.exception("batch failed", extra={"model": "voc", "model_dir": Path("/models/voc")})
    entry = json.loads(stream.getvalue())
    assert entry["level"] == "ERROR"
    assert entry["message"] == "batch failed"
    assert entry["model_dir"] == "/models/voc"
    assert "ValueError: bad tensor shape" in entry["exception"]


def test_text_access_line_reads_as_key_value_pairs(
    access_log: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = access_log
    handler.setFormatter(TextFormatter())
    log_request(logger)
    logger.info("plain message")
    request_line, plain_line = stream.getvalue().splitlines()
    assert request_line.endswith(
        f"INFO {ACCESS_LOGGER}.test: call method=/visionrpc.v1.InferenceService/Predict status=OK"
        " latency_ms=12.346 request_id=req-17 model=pets version=3 images=4 failed_images=1"
    )
    assert plain_line.endswith(f"INFO {ACCESS_LOGGER}.test: plain message")


def test_a_text_line_stays_one_line_whatever_its_message_and_fields_hold(
    access_log: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = access_log
    handler.setFormatter(TextFormatter())
    logger.warning("not serving %s", "pets\nINFO forged line")
    logger.info("call", extra={"model": "a b\x1b[2J", "version": ""})
    warning, call = stream.getvalue().splitlines()
    assert warning.endswith("not serving pets\\x0aINFO forged line")
    assert call.endswith('call model="a b\\x1b[2J" version=""')


def test_records_logged_inside_a_call_carry_its_request_id(
    request_id_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = request_id_log

    async def call(name: str) -> None:
        request_id.set(name)
        await asyncio.sleep(0)
        logger.info("inside", extra={"call": name})

    async def both() -> None:
        await asyncio.gather(call("first"), call("second"))

    asyncio.run(both())
    logger.info("outside")
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    inside = [(entry["call"], entry["request_id"]) for entry in entries[:2]]
    assert sorted(inside) == [("first", "first"), ("second", "second")]
    assert "request_id" not in entries[2]


SETUP_TWICE = """
import logging, sys
from visionrpc.server.logging_setup import configure_logging
foreign = logging.StreamHandler(sys.stdout)
logging.getLogger().addHandler(foreign)
configure_logging("warning", "text")
configure_logging("debug", "json")
logging.getLogger("visionrpc.batching").debug("batch ran", extra={"size": 8})
"""


def test_configure_logging_twice_replaces_only_its_own_handler() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SETUP_TWICE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    stderr_lines = result.stderr.splitlines()
    assert len(stderr_lines) == 1
    entry = json.loads(stderr_lines[0])
    assert (entry["level"], entry["logger"], entry["size"]) == ("DEBUG", "visionrpc.batching", 8)
    assert result.stdout.splitlines() == ["batch ran"]


@pytest.mark.parametrize(("level", "fmt"), [("INFO", "yaml"), ("LOUD", "json")])
def test_configure_logging_refuses_unknown_settings(level: str, fmt: str) -> None:
    with pytest.raises(ValueError):
        configure_logging(level, fmt)  # type: ignore[arg-type]


async def test_records_a_handler_and_its_tasks_log_carry_the_calls_request_id(
    request_id_log: tuple[logging.Logger, io.StringIO],
) -> None:
    """Through the real interceptor on a real server, with a handler that only logs."""
    logger, stream = request_id_log

    async def work(request: bytes, context: object) -> bytes:
        async def child() -> None:
            logger.info("in a task the handler started")

        await asyncio.create_task(child())
        logger.info("in the handler")
        return request

    metrics = ServerMetrics(CollectorRegistry())
    server = grpc.aio.server(interceptors=[ObservabilityInterceptor(metrics, lambda _m, v: v)])
    handlers = {"Work": grpc.unary_unary_rpc_method_handler(work)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Logs", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call: Any = channel.unary_unary("/test.Logs/Work")  # type: ignore[call-arg]
            await asyncio.gather(
                call(b"a", metadata=(("x-request-id", "traced-1"),)),
                call(b"b", metadata=(("x-request-id", "traced-2"),)),
            )
    finally:
        await server.stop(0)
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert sorted((entry["request_id"], entry["message"]) for entry in entries) == [
        ("traced-1", "in a task the handler started"),
        ("traced-1", "in the handler"),
        ("traced-2", "in a task the handler started"),
        ("traced-2", "in the handler"),
    ]
