"""``visionrpc serve`` as a real process, with what tests read from it: health, the admin
API, Prometheus metrics, its JSON log and its RSS."""

from __future__ import annotations

import collections
import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.server import free_port
from visionrpc.client.errors import VisionRPCError
from visionrpc.client.model_control import ModelControlClient

SERVE = [
    sys.executable, "-m", "visionrpc.cli", "serve",
    "--providers", "CPUExecutionProvider", "--intra-op-threads", "1", "--log-format", "json",
]  # fmt: skip


def rss_bytes_of(pid: int) -> int:
    """A process's resident set size (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS line for process {pid}")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    address: str
    metrics_port: int
    log: Path

    def rss_bytes(self) -> int:
        return rss_bytes_of(self.process.pid)

    def requests_by_code(self, model: str) -> dict[str, int]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        counts: collections.Counter[str] = collections.Counter()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "visionrpc_requests_total" and sample.labels["model"] == model:
                    counts[sample.labels["code"]] += int(sample.value)
        return {code: value for code, value in counts.items() if value}

    def metric(self, name: str, **labels: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0

    def log_records(self) -> list[dict[str, object]]:
        records = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records


@contextlib.contextmanager
def serving(root: Path, tmp_path: Path, *flags: str, ready_model: str = "") -> Iterator[Server]:
    """The process, once ``ready_model`` is SERVING (or, without one, its admin API answers)."""
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*SERVE, "--repository", str(root), "--port", str(port),
             "--metrics-port", str(metrics_port), *flags],
            stdout=output,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = Server(process, f"127.0.0.1:{port}", metrics_port, log)
    try:
        if ready_model:
            wait_until_serving(server, ready_model)
        else:
            wait_for_index(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def wait_until_serving(server: Server, model: str) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert server.process.poll() is None, server.log.read_text()
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(service=model), timeout=1)
            except grpc.RpcError:
                answer = None
            if answer is not None and answer.status == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
    raise AssertionError(f"{model} never became SERVING")


def wait_for_index(server: Server) -> None:
    """Until the process answers the admin API (it has finished loading)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.process.poll() is None, server.log.read_text()
        try:
            with ModelControlClient(server.address, timeout=2) as control:
                control.index()
        except VisionRPCError:
            time.sleep(0.1)
            continue
        return
    raise AssertionError("the server never answered the repository index")
