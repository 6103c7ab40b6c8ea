"""``visionrpc serve`` as a real process: start-up failures, and SIGTERM with a call in flight."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.server import free_port
from tests.server.support import encoded_request, png, solid
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc

SERVE_COMMAND = [
    sys.executable, "-m", "visionrpc.cli", "serve",
    "--metrics-port", "0", "--providers", "CPUExecutionProvider", "--log-format", "json",
]  # fmt: skip


@pytest.fixture
def serving_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    root = tmp_path / "models"
    # Each request waits 1.5 s in the queue, long enough to still be in flight at SIGTERM.
    write_channel_mean_classifier(
        root, batching={"max_queue_delay_ms": 1500, "wait_when_idle": True}
    )
    port = free_port()
    process = subprocess.Popen(
        [*SERVE_COMMAND, "--repository", str(root), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield process, f"127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def wait_until_serving(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(service="colors"), timeout=1)
            except grpc.RpcError:
                time.sleep(0.1)
                continue
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return
        raise AssertionError("the server never became SERVING")


def test_sigterm_finishes_the_call_in_flight_and_exits_zero(
    serving_process: tuple[subprocess.Popen[str], str],
) -> None:
    process, address = serving_process
    wait_until_serving(address)
    outcome: dict[str, object] = {}
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        def call() -> None:
            try:
                outcome["response"] = stub.Predict(
                    encoded_request("colors", png(solid(255, 0, 0))), timeout=30
                )
            except grpc.RpcError as exc:
                outcome["error"] = exc

        in_flight = threading.Thread(target=call)
        in_flight.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(encoded_request("colors", png(solid(255, 0, 0))), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        in_flight.join(timeout=30)
    assert "error" not in outcome, outcome.get("error")
    response = outcome["response"]
    assert isinstance(response, pb.PredictResponse)
    assert response.results[0].classification.top[0].label == "red"
    assert process.wait(timeout=30) == 0
    log = process.stdout.read() if process.stdout else ""
    assert '"message": "model colors version 1: provider CPUExecutionProvider' in log
    assert "shutting down" in log


def test_a_missing_repository_or_a_taken_port_exits_one_with_the_reason(tmp_path: Path) -> None:
    missing = subprocess.run(
        [*SERVE_COMMAND, "--repository", str(tmp_path / "absent"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1
    assert "is not a directory" in missing.stderr
    root = tmp_path / "models"
    write_channel_mean_classifier(root)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run(
            [*SERVE_COMMAND, "--repository", str(root), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert busy.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in busy.stderr


def test_a_bad_setting_exits_two_naming_it(tmp_path: Path) -> None:
    bad = subprocess.run(
        [*SERVE_COMMAND, "--repository", str(tmp_path), "--max-batch-size", "many"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "--max-batch-size" in bad.stderr
