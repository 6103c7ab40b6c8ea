"""Session fixtures: one private Docker engine and one CPU serving image for all tests here."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .engine import SCRIPTS, DockerEngine, require_engine_tools, run

# The tag the Dockerfile's CPU variant is documented with; the engine holds a local stand-in.
CPU_BASE_IMAGE = "python:3.11-slim"
CPU_IMAGE = "visionrpc:test-cpu"


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    require_engine_tools()
    # Short path: containerd's sockets live under it and unix socket paths are limited.
    state = Path(tempfile.mkdtemp(prefix="vrpc-engine-"))
    try:
        host = run([str(SCRIPTS / "engine.sh"), "start", str(state)], timeout=120)
        yield DockerEngine(host.strip().splitlines()[-1])
    finally:
        run([str(SCRIPTS / "engine.sh"), "stop", str(state)], timeout=120)


@pytest.fixture(scope="session")
def cpu_image(docker_engine: DockerEngine) -> str:
    # Keeping the base's root file system between local runs saves a minute; CI has none.
    cache = os.environ.get("VISIONRPC_CONTAINER_CACHE")
    docker_engine.script(
        "stand-in-base.sh", CPU_BASE_IMAGE, *([cache] if cache else []), timeout=600
    )
    docker_engine.script("build.sh", CPU_IMAGE, "cpu", CPU_BASE_IMAGE, timeout=900)
    return CPU_IMAGE
