"""Calls that end without an answer: cancelled streams are counted request by request, and
expired or cancelled calls under load end quietly, each counted under its code."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.server import RunningServer, free_port, running_server
from tests.server.support import encoded_request, png, random_image, solid
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc

RED = png(solid(255, 0, 0))
# Waits a second for company before running: a request stays in flight that long.
PATIENT_DELAY_MS = 1000
INFERENCE = "visionrpc.v1.InferenceService"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_channel_mean_classifier(root, "colors")
    write_channel_mean_classifier(
        root, "patient", batching={"max_queue_delay_ms": PATIENT_DELAY_MS, "wait_when_idle": True}
    )
    return root


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def sample(server: RunningServer, name: str, **labels: str) -> float | None:
    return server.metrics.registry.get_sample_value(name, labels)


async def test_requests_a_cancelled_stream_left_unanswered_are_counted_as_cancelled(
    repository: Path,
) -> None:
    async with (
        running_server(repository) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        sent = asyncio.Event()

        async def requests() -> AsyncIterator[pb.PredictRequest]:
            for n in range(3):
                yield encoded_request("patient", RED, RED, request_id=str(n))
            sent.set()
            await asyncio.Event().wait()  # the stream stays open until cancelled

        call = stub.PredictStream(requests())
        await sent.wait()
        await wait_until(
            lambda: sample(server, "visionrpc_in_flight_requests", model="patient") == 3.0
        )
        call.cancel()
        patient = {"model": "patient", "version": "1"}
        await wait_until(
            lambda: sample(server, "visionrpc_requests_total", **patient, code="CANCELLED") == 3.0
        )
        stream = {"grpc_type": "bidi_stream", "grpc_service": INFERENCE}
        stream["grpc_method"] = "PredictStream"
        await wait_until(
            lambda: (
                sample(server, "grpc_server_handled_total", **stream, grpc_code="CANCELLED") == 1.0
            )
        )
        assert sample(server, "visionrpc_images_total", **patient, code="CANCELLED") == 6.0
        assert sample(server, "visionrpc_in_flight_requests", model="patient") == 0.0
        assert sample(server, "grpc_server_msg_received_total", **stream) == 3.0
        assert sample(server, "grpc_server_msg_sent_total", **stream) == 0.0


def handled_by_code(exposition: str) -> tuple[float, Counter[str]]:
    """Calls started, and calls handled by ``grpc_code``, over every Inference method."""
    started = 0.0
    handled: Counter[str] = Counter()
    for family in text_string_to_metric_families(exposition):
        for metric in family.samples:
            if metric.labels.get("grpc_service") != INFERENCE:
                continue
            if metric.name == "grpc_server_started_total":
                started += metric.value
            elif metric.name == "grpc_server_handled_total":
                handled[metric.labels["grpc_code"]] += int(metric.value)
    return started, handled


async def short_deadline_load(address: str, image: bytes) -> Counter[str]:
    """24 unary and 8 streaming callers with 50 ms deadlines, and callers who give up."""
    outcomes: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        async def unary() -> None:
            for _ in range(12):
                try:
                    await stub.Predict(encoded_request("colors", image, image), timeout=0.05)
                    outcomes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    outcomes[error.code().name] += 1

        async def streaming() -> None:
            for _ in range(12):
                requests = [encoded_request("colors", image, request_id=str(n)) for n in range(4)]
                call = stub.PredictStream(iter(requests), timeout=0.05)
                try:
                    async for _ in call:
                        pass
                    outcomes["stream OK"] += 1
                except grpc.aio.AioRpcError as error:
                    outcomes[f"stream {error.code().name}"] += 1

        # On the model that waits a second for company, whatever the machine's speed, a
        # call is still in its handler when its caller leaves or its deadline passes.
        async def impatient() -> None:
            for _ in range(6):
                call = stub.Predict(encoded_request("patient", RED))
                await asyncio.sleep(0.1)
                call.cancel()
                outcomes["gave up"] += 1

        async def late() -> None:
            for _ in range(6):
                try:
                    await stub.Predict(encoded_request("patient", RED), timeout=0.05)
                    outcomes["patient OK"] += 1
                except grpc.aio.AioRpcError as error:
                    outcomes[f"patient {error.code().name}"] += 1

        await asyncio.gather(
            *(unary() for _ in range(24)),
            *(streaming() for _ in range(8)),
            *(impatient() for _ in range(4)),
            *(late() for _ in range(4)),
        )
    return outcomes


async def test_expired_and_cancelled_calls_end_quietly_and_are_counted_under_their_codes(
    repository: Path, tmp_path: Path
) -> None:
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "visionrpc.cli", "serve",
            "--repository", str(repository),
            "--port", str(port),
            "--metrics-port", str(metrics_port),
            "--providers", "CPUExecutionProvider",
            "--intra-op-threads", "1",
            stdout=output,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        address = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(address) as channel:
            await asyncio.wait_for(channel.channel_ready(), timeout=60)
            stub = pb_grpc.InferenceServiceStub(channel)
            await stub.Predict(encoded_request("colors", RED), wait_for_ready=True, timeout=60)
        image = png(random_image(np.random.default_rng(0), 640, 480))
        outcomes = await short_deadline_load(address, image)
        url = f"http://127.0.0.1:{metrics_port}/metrics"

        def scrape() -> str:
            with urllib.request.urlopen(url, timeout=10) as response:
                return str(response.read().decode())

        # A cancelled handler may finish its bookkeeping just after its caller has left.
        for _ in range(100):
            started, handled = handled_by_code(await asyncio.to_thread(scrape))
            if sum(handled.values()) == started:
                break
            await asyncio.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), timeout=60)
    text = log.read_text()
    assert process.returncode == 0, text
    # The load did produce the endings this is about, on both sides.
    assert outcomes["patient DEADLINE_EXCEEDED"] == 24, outcomes
    assert handled["DEADLINE_EXCEEDED"] > 0, handled
    assert handled["CANCELLED"] > 0, handled
    # Every call the server started ended counted, under a code it could have.
    assert sum(handled.values()) == started
    assert set(handled) <= {"OK", "DEADLINE_EXCEEDED", "CANCELLED"}, handled
    assert "Traceback" not in text
    assert [line for line in text.splitlines() if " ERROR " in line] == []
