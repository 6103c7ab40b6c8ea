"""A throw-away Docker engine for the container tests, driven through ``.ci/container/``.

The engine (dockerd on vfs, all state in a temporary folder) and the stand-in base images are
made by the shell scripts there, so a person can run the same steps by hand.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / ".ci" / "container"
# Debian's CLI speaks its daemon's API and has BuildKit built in; another `docker` on PATH may not.
DOCKER_CLI = "/usr/bin/docker"


def missing_or_skip(problems: list[str]) -> None:
    """CI must run every container test: a missing tool fails there and skips elsewhere."""
    if not problems:
        return
    message = "; ".join(problems) + " (install with: make system-deps)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_tools(*tools: str) -> None:
    missing_or_skip([f"{tool} is not installed" for tool in tools if shutil.which(tool) is None])


def require_engine_tools() -> None:
    problems = [
        f"{tool} is not installed" for tool in ("dockerd", "debootstrap") if not shutil.which(tool)
    ]
    if not Path(DOCKER_CLI).exists():
        problems.append(f"{DOCKER_CLI} (Debian's docker.io) is not installed")
    if os.geteuid() != 0:
        problems.append("a private dockerd and debootstrap need root")
    missing_or_skip(problems)


def run(command: list[str], *, timeout: float, env: dict[str, str] | None = None) -> str:
    """Run a command; on failure the assertion carries its output, which says why."""
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    assert completed.returncode == 0, (
        f"{' '.join(command)} exited {completed.returncode}\n"
        f"stdout:\n{completed.stdout[-4000:]}\nstderr:\n{completed.stderr[-4000:]}"
    )
    return completed.stdout


@dataclass(frozen=True)
class DockerEngine:
    host: str

    def docker(self, *args: str, timeout: float = 120) -> str:
        return run([DOCKER_CLI, "-H", self.host, *args], timeout=timeout)

    def script(self, name: str, *args: str, timeout: float) -> str:
        env = {**os.environ, "DOCKER_HOST": self.host}
        return run([str(SCRIPTS / name), *args], timeout=timeout, env=env)

    def inspect(self, container: str, template: str) -> str:
        return self.docker("inspect", "--format", template, container).strip()

    def logs(self, container: str) -> str:
        """What the container wrote to stdout and stderr, interleaved."""
        completed = subprocess.run(
            [DOCKER_CLI, "-H", self.host, "logs", container],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
            check=False,
        )
        return completed.stdout
