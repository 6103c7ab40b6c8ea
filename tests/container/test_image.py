"""The CPU serving image, built from the Dockerfile and run the way a deployment runs it.

One container serves a repository of three analytic models (the demo's names and tasks:
``pets`` classification, ``voc`` multi-label, ``biwi`` points, with answers known exactly)
from a read-only mount with a read-only root file system; the tests talk to it through the
Python client, scrape its metrics, watch the image's own HEALTHCHECK, and finally stop it
with SIGTERM. Another container serves models trained by the demo's own code path, and must
answer exactly as the in-process server does.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers.demo import QUICK_RUNS
from tests.helpers.images import dot
from tests.helpers.onnx_models import (
    write_centroid_points,
    write_channel_mean_classifier,
    write_channel_mean_multilabel,
)
from tests.helpers.server import server_in_thread
from visionrpc.client import (
    Classification,
    Client,
    HealthStatus,
    MultiLabel,
    Points,
    VisionRPCError,
)
from visionrpc.training.datasets import read_dataset
from visionrpc.training.demo import build_demo

from .engine import DockerEngine

# The first test builds the engine, the base and the image: minutes, not seconds.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PET_BREEDS = ("abyssinian", "beagle", "chihuahua")
VOC_CLASSES = ("person", "tree", "sky")
# Given to the server inside the container; `docker stop` kills what is still running after
# that plus a margin for the batchers to close and Python to exit.
SERVER_GRACE_SECONDS = 5
STOP_TIMEOUT_SECONDS = SERVER_GRACE_SECONDS + 5
STARTUP_TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class ServedContainer:
    name: str
    grpc_address: str
    metrics_url: str
    images: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_demo_repository(repository: Path) -> None:
    write_channel_mean_classifier(repository, name="pets", size=16, labels=PET_BREEDS)
    write_channel_mean_multilabel(repository, name="voc", size=16, labels=VOC_CLASSES)
    write_centroid_points(repository, name="biwi", size=32, labels=("head_centre",))


def write_images(folder: Path) -> None:
    Image.new("RGB", (64, 48), (250, 10, 10)).save(folder / "red.png")
    dot(128, 96, centre=(40.5, 60.5), radius=10).save(folder / "head.png")


def wait_until_serving(engine: DockerEngine, name: str, address: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    with Client(address, timeout=2, retries=None) as client:
        while time.monotonic() < deadline:
            if engine.inspect(name, "{{.State.Status}}") != "running":
                pytest.fail(f"container stopped while starting:\n{container_logs(engine, name)}")
            try:
                if client.health() is HealthStatus.SERVING:
                    return
            except VisionRPCError:
                pass  # not listening yet
            time.sleep(0.5)
    pytest.fail(f"not SERVING after {STARTUP_TIMEOUT_SECONDS} s:\n{container_logs(engine, name)}")


def container_logs(engine: DockerEngine, name: str) -> str:
    return engine.logs(name)[-6000:]


@contextlib.contextmanager
def running_container(
    engine: DockerEngine, image: str, repository: Path, name: str
) -> Iterator[tuple[str, str]]:
    """Serve ``repository`` from ``image``; yields the gRPC address and the metrics URL."""
    # The server runs as uid 10001: the mounted repository must be readable by others.
    for path in [repository, *repository.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    port, metrics_port = free_port(), free_port()
    engine.docker(
        "run", "--detach", "--name", name,
        # The engine has no bridge; loopback on the host keeps the test off the network.
        "--network", "host",
        "--read-only", "--tmpfs", "/tmp",
        "--volume", f"{repository}:/models:ro",
        "--env", "VISIONRPC_HOST=127.0.0.1",
        "--env", f"VISIONRPC_PORT={port}",
        "--env", f"VISIONRPC_METRICS_PORT={metrics_port}",
        "--env", f"VISIONRPC_SHUTDOWN_GRACE_SECONDS={SERVER_GRACE_SECONDS}",
        # The image's own HEALTHCHECK command, run more often than its default.
        "--health-interval", "1s",
        image,
        "--log-format", "json",
    )  # fmt: skip
    try:
        wait_until_serving(engine, name, f"127.0.0.1:{port}")
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        engine.docker("rm", "--force", "--volumes", name)


@pytest.fixture(scope="module")
def served(docker_engine: DockerEngine, cpu_image: str) -> Iterator[ServedContainer]:
    scratch = Path(tempfile.mkdtemp(prefix="vrpc-container-"))
    repository = scratch / "models"
    repository.mkdir()
    write_demo_repository(repository)
    write_images(scratch)
    name = "visionrpc-under-test"
    try:
        with running_container(docker_engine, cpu_image, repository, name) as (address, url):
            yield ServedContainer(name=name, grpc_address=address, metrics_url=url, images=scratch)
    finally:
        shutil.rmtree(scratch)


def test_container_answers_the_trained_demo_models_as_the_local_server_does(
    docker_engine: DockerEngine, cpu_image: str, tmp_path: Path
) -> None:
    # Models from the demo's own code path (tiny sizes), served in the image and in-process:
    # the same files must get the same answers, so the image's dependencies change nothing.
    repository = tmp_path / "demo-models"
    build_demo(repository, cache=tmp_path / "data", quiet=True, runs=QUICK_RUNS)
    files = {
        kind: read_dataset(kind, tmp_path / "data" / kind).valid[0].path for kind in QUICK_RUNS
    }
    container = running_container(docker_engine, cpu_image, repository, "visionrpc-demo")
    with container as (address, _), Client(address, timeout=30) as client:
        in_container = {
            kind: client.predict(kind, path, all_scores=kind == "voc")
            for kind, path in files.items()
        }
    with server_in_thread(repository) as local, Client(local.address, timeout=30) as client:
        in_process = {
            kind: client.predict(kind, path, all_scores=kind == "voc")
            for kind, path in files.items()
        }
    assert isinstance(in_container["pets"], Classification)
    assert isinstance(in_container["voc"], MultiLabel)
    assert isinstance(in_container["biwi"], Points)
    for kind in QUICK_RUNS:
        assert numbers(in_container[kind]) == pytest.approx(numbers(in_process[kind]), abs=1e-5)


def numbers(prediction: object) -> list[float]:
    """Every score or coordinate of a prediction, in a fixed order."""
    if isinstance(prediction, Classification):
        return [entry.score for entry in prediction.top]
    if isinstance(prediction, MultiLabel):
        return [entry.score for entry in prediction.all_scores]
    assert isinstance(prediction, Points)
    return [value for point in prediction.points for value in (point.x, point.y)]


def test_serving_image_runs_as_non_root_with_onnxruntime_and_without_torch(
    docker_engine: DockerEngine, cpu_image: str
) -> None:
    assert docker_engine.inspect(cpu_image, "{{.Config.User}}") == "10001:10001"
    probe = (
        "import importlib.util, json, pathlib, shutil, onnxruntime, visionrpc.server; "
        "print(json.dumps({"
        "'torch': importlib.util.find_spec('torch') is not None, "
        "'server_is_symlink': pathlib.Path(visionrpc.server.__file__).parent.is_symlink(), "
        "'providers': onnxruntime.get_available_providers(), "
        "'compilers': [c for c in ('gcc', 'cc', 'g++') if shutil.which(c)]}))"
    )
    report = json.loads(
        docker_engine.docker(
            "run", "--rm", "--network", "none", "--entrypoint", "python3", cpu_image, "-c", probe
        )
    )
    assert report["torch"] is False
    assert report["server_is_symlink"] is False
    assert report["compilers"] == []
    assert "CPUExecutionProvider" in report["providers"]
    assert "CUDAExecutionProvider" not in report["providers"]


def test_container_serves_the_three_demo_tasks(served: ServedContainer) -> None:
    with Client(served.grpc_address, timeout=30) as client:
        assert sorted(model.name for model in client.models()) == ["biwi", "pets", "voc"]
        pets = client.predict("pets", served.images / "red.png")
        voc = client.predict("voc", served.images / "red.png")
        biwi = client.predict("biwi", served.images / "head.png")
    assert isinstance(pets, Classification)
    assert pets.label == "abyssinian"
    assert isinstance(voc, MultiLabel)
    assert voc.names == ("person",)
    assert isinstance(biwi, Points)
    (head,) = biwi.points
    # Squished to 32x32 and back: the centroid moves by well under one model pixel (4 px here).
    assert head.name == "head_centre"
    assert abs(head.x - 40.5) < 4 and abs(head.y - 60.5) < 4


def test_metrics_endpoint_counts_each_models_requests(served: ServedContainer) -> None:
    with Client(served.grpc_address, timeout=30) as client:
        for model in ("pets", "voc"):
            client.predict(model, served.images / "red.png")
    with urllib.request.urlopen(served.metrics_url, timeout=10) as response:
        exposition = response.read().decode()
    counted = {
        line.split('model="')[1].split('"')[0]
        for line in exposition.splitlines()
        if line.startswith("visionrpc_requests_total{") and not line.rstrip().endswith(" 0.0")
    }
    assert {"pets", "voc"} <= counted


def test_image_healthcheck_reports_healthy(
    docker_engine: DockerEngine, served: ServedContainer
) -> None:
    deadline = time.monotonic() + 60
    status = ""
    while time.monotonic() < deadline:
        status = docker_engine.inspect(served.name, "{{.State.Health.Status}}")
        if status != "starting":
            break
        time.sleep(0.5)
    assert status == "healthy", docker_engine.inspect(served.name, "{{json .State.Health}}")


def test_sigterm_drains_and_exits_zero(
    docker_engine: DockerEngine, served: ServedContainer
) -> None:
    # `docker stop` sends SIGTERM, then SIGKILL after the timeout: exit code 0 means the server
    # drained and returned by itself (a kill would read 137).
    docker_engine.docker("stop", "--time", str(STOP_TIMEOUT_SECONDS), served.name, timeout=60)
    state = json.loads(docker_engine.inspect(served.name, "{{json .State}}"))
    assert (state["ExitCode"], state["OOMKilled"]) == (0, False), container_logs(
        docker_engine, served.name
    )
    log_lines = [
        json.loads(line)
        for line in container_logs(docker_engine, served.name).splitlines()
        if line.startswith("{")
    ]
    assert any("shutting down" in entry["message"] for entry in log_lines)


def test_image_declares_ports_volume_and_entrypoint(
    docker_engine: DockerEngine, cpu_image: str
) -> None:
    config = json.loads(docker_engine.inspect(cpu_image, "{{json .Config}}"))
    assert sorted(config["ExposedPorts"]) == ["8001/tcp", "8002/tcp"]
    assert list(config["Volumes"]) == ["/models"]
    assert config["Entrypoint"] == ["visionrpc", "serve"]
    assert {"VISIONRPC_HOST=0.0.0.0", "VISIONRPC_REPOSITORY=/models"} <= set(config["Env"])
    assert config["Healthcheck"]["Test"][:3] == ["CMD", "sh", "-c"]
    assert "visionrpc health" in config["Healthcheck"]["Test"][3]
