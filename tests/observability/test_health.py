"""grpc.health.v1 of a real ``visionrpc serve`` process across start-up and SIGTERM.

While models load, the port already answers health (NOT_SERVING) and Inference calls
(UNAVAILABLE); SERVING follows once every model is loaded and warm. On SIGTERM, health
watchers hear NOT_SERVING at once, while a call already in flight still completes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.server import free_port
from tests.observability.slow_model import write_slow_model
from tests.server.support import encoded_request, png, solid
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RED = png(solid(255, 0, 0))


class ServeProcess:
    def __init__(self, repository: Path, *flags: str) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "visionrpc.cli", "serve",
                "--repository", str(repository),
                "--port", str(self.port),
                "--metrics-port", str(self.metrics_port),
                "--providers", "CPUExecutionProvider",
                "--intra-op-threads", "1",
                "--log-format", "json",
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip

    def metric(self, line_start: str) -> float | None:
        """The value of the exposition line that starts with ``line_start``."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                body = response.read().decode()
        except OSError:
            return None
        for line in body.splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        return None

    def stop(self) -> str:
        """SIGTERM, the exit code checked, and everything the process logged."""
        self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=60)
        assert self.process.returncode == 0, output
        return output


@pytest.fixture
def processes() -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for serve in started:
        if serve.process.poll() is None:
            serve.process.kill()
        serve.process.communicate(timeout=30)


def first_health_answer(health: health_pb2_grpc.HealthStub, service: str) -> int:
    """Polls until the port answers; the interval is far below the slow model's warm-up."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
        except grpc.RpcError:
            time.sleep(0.02)
            continue
        return int(answer.status)
    raise AssertionError("the health service never answered")


def wait_for_status(health: health_pb2_grpc.HealthStub, service: str, status: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        if answer.status == status:
            return
        time.sleep(0.1)
    raise AssertionError(f"{service!r} never became {status}")


def test_health_answers_not_serving_while_models_load_then_serving(
    tmp_path: Path, processes: list[ServeProcess]
) -> None:
    root = tmp_path / "models"
    write_channel_mean_classifier(root, "colors")
    # Loads after colors (by name) and takes seconds to warm up.
    write_slow_model(root, "slow")
    serve = ServeProcess(root)
    processes.append(serve)
    with grpc.insecure_channel(serve.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.InferenceServiceStub(channel)
        assert first_health_answer(health, "") == NOT_SERVING
        for service in ("visionrpc.v1.InferenceService", "colors", "slow"):
            check = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert check.status == NOT_SERVING, service
        with pytest.raises(grpc.RpcError) as loading:
            stub.Predict(encoded_request("colors", RED), timeout=5)
        assert loading.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "loading" in str(loading.value.details())
        assert serve.metric('visionrpc_model_info{model="slow"') is None
        wait_for_status(health, "", SERVING)
        for service in ("visionrpc.v1.InferenceService", "colors", "slow"):
            check = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert check.status == SERVING, service
        response = stub.Predict(encoded_request("colors", RED), timeout=30)
        assert response.results[0].classification.top[0].label == "red"
        assert serve.metric('visionrpc_model_info{model="slow"') == 1.0
    log = [json.loads(line) for line in serve.stop().splitlines() if line.startswith("{")]
    (slow,) = [
        entry
        for entry in log
        if entry.get("model") == "slow" and entry["logger"] == "visionrpc.server.app"
    ]
    assert slow["message"].startswith("model slow version 1: provider CPUExecutionProvider")
    assert (slow["version"], slow["provider"], slow["max_batch_size"]) == (
        "1",
        "CPUExecutionProvider",
        1,
    )
    assert slow["warmup_seconds"] > 0


def test_sigterm_turns_health_not_serving_while_the_call_in_flight_completes(
    tmp_path: Path, processes: list[ServeProcess]
) -> None:
    root = tmp_path / "models"
    # A request waits 1.5 s in the queue: in flight when SIGTERM comes.
    write_channel_mean_classifier(
        root, "colors", batching={"max_queue_delay_ms": 1500, "wait_when_idle": True}
    )
    serve = ServeProcess(root, "--shutdown-grace-seconds", "10")
    processes.append(serve)
    heard: list[tuple[int, bool]] = []
    outcome: dict[str, object] = {}
    call_done = threading.Event()
    with grpc.insecure_channel(serve.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.InferenceServiceStub(channel)
        first_health_answer(health, "")
        wait_for_status(health, "", SERVING)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="colors"))

        def listen() -> None:
            try:
                for answer in watch:
                    heard.append((int(answer.status), call_done.is_set()))
            except grpc.RpcError:
                pass  # cancelled below, once the call completed

        def call() -> None:
            try:
                outcome["response"] = stub.Predict(
                    encoded_request("colors", RED),
                    timeout=30,
                    metadata=(("x-request-id", "drain-1"),),
                )
            except grpc.RpcError as exc:
                outcome["error"] = exc
            call_done.set()

        listener = threading.Thread(target=listen)
        listener.start()
        caller = threading.Thread(target=call)
        caller.start()
        in_flight = 'visionrpc_in_flight_requests{model="colors"}'
        deadline = time.monotonic() + 30
        while serve.metric(in_flight) != 1.0:
            assert time.monotonic() < deadline, "the call never reached the server"
            time.sleep(0.05)
        serve.process.send_signal(signal.SIGTERM)
        caller.join(timeout=30)
        watch.cancel()
        listener.join(timeout=30)
    assert "error" not in outcome, outcome.get("error")
    response = outcome["response"]
    assert isinstance(response, pb.PredictResponse)
    assert response.results[0].classification.top[0].label == "red"
    # NOT_SERVING reached the watcher before the call in flight had its answer.
    assert heard == [(SERVING, False), (NOT_SERVING, False)]
    output, _ = serve.process.communicate(timeout=60)
    assert serve.process.returncode == 0, output
    log = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    access = [
        entry
        for entry in log
        if entry["logger"] == "visionrpc.access" and entry["method"].endswith("/Predict")
    ]
    assert [(e["request_id"], e["status"], e["model"], e["images"]) for e in access] == [
        ("drain-1", "OK", "colors", 1)
    ]


def test_sigterm_ends_open_health_watches_instead_of_waiting_out_the_grace_period(
    tmp_path: Path, processes: list[ServeProcess]
) -> None:
    root = tmp_path / "models"
    write_channel_mean_classifier(root, "colors")
    grace_seconds = 20.0
    serve = ServeProcess(root, "--shutdown-grace-seconds", str(grace_seconds))
    processes.append(serve)
    heard: dict[str, list[int]] = {"": [], "colors": []}
    endings: dict[str, grpc.StatusCode] = {}
    with grpc.insecure_channel(serve.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        first_health_answer(health, "")
        wait_for_status(health, "", SERVING)

        def listen(service: str) -> None:
            try:
                for answer in health.Watch(health_pb2.HealthCheckRequest(service=service)):
                    heard[service].append(int(answer.status))
            except grpc.RpcError as exc:
                endings[service] = exc.code()

        listeners = [threading.Thread(target=listen, args=(service,)) for service in heard]
        for listener in listeners:
            listener.start()
        deadline = time.monotonic() + 30
        while not all(heard.values()):
            assert time.monotonic() < deadline, "the watches never sent their first status"
            time.sleep(0.02)
        serve.process.send_signal(signal.SIGTERM)
        # A bound on behaviour, far below the grace period, not a measure of speed.
        output, _ = serve.process.communicate(timeout=grace_seconds * 0.4)
        for listener in listeners:
            listener.join(timeout=30)
    assert serve.process.returncode == 0, output
    assert heard == {"": [SERVING, NOT_SERVING], "colors": [SERVING, NOT_SERVING]}
    assert endings == {"": grpc.StatusCode.UNAVAILABLE, "colors": grpc.StatusCode.UNAVAILABLE}
