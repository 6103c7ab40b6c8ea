"""A real Prometheus server for tests: Debian's binary, loopback only, scraping every second.

    with PrometheusServer(targets=["127.0.0.1:9464"]) as prometheus:
        prometheus.wait_for('up{job="visionrpc"}', lambda value: value == 1.0)
        assert prometheus.value("visionrpc_requests_total") == 3.0

Without the binaries a test skips with the install hint, except in CI (``CI=true``),
where it fails: CI installs them (``.ci/system-deps``) and a skip would hide a broken set-up.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

INSTALL_HINT = (
    "install Debian's prometheus package: `make system-deps` or `apt-get install prometheus`"
)
SCRAPE_JOB = "visionrpc"


def require_binary(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``; skips (or fails in CI) when missing."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} not found on PATH; {INSTALL_HINT}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float


def scrape_config(targets: Sequence[str]) -> str:
    """A Prometheus config scraping ``targets`` every second, as JSON (a subset of YAML)."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": SCRAPE_JOB,
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    return json.dumps(config, indent=2)


class PrometheusServer:
    """Starts Prometheus on a free loopback port with its storage in a temporary folder."""

    def __init__(self, targets: Sequence[str], ready_timeout: float = 60.0) -> None:
        self._binary = require_binary("prometheus")
        self._targets = list(targets)
        self._ready_timeout = ready_timeout
        self._workdir = tempfile.TemporaryDirectory(prefix="visionrpc-prometheus-")
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = Path(self._workdir.name) / "prometheus.log"
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        workdir = Path(self._workdir.name)
        config_path = workdir / "prometheus.yml"
        config_path.write_text(scrape_config(self._targets))
        with self._log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    self._binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self._ready_timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited at start:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {self._ready_timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
            self._process = None
        self._workdir.cleanup()

    def log(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""

    def _api(self, path: str, params: dict[str, str]) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus API error for {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[Sample]:
        """Evaluates ``expr`` now; a scalar comes back as one sample without labels."""
        data = self._api("/api/v1/query", {"query": expr})
        if data["resultType"] == "scalar":
            return [Sample({}, float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise ValueError(f"{expr!r} is a {data['resultType']}, not an instant vector")
        return [Sample(item["metric"], float(item["value"][1])) for item in data["result"]]

    def value(self, expr: str) -> float | None:
        """The single value of ``expr``, None when it has no samples; several is an error."""
        samples = self.query(expr)
        if len(samples) > 1:
            raise ValueError(f"{expr!r} returned {len(samples)} series: {samples}")
        return samples[0].value if samples else None

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[float | None], bool],
        timeout: float = 30.0,
    ) -> float | None:
        """Polls :meth:`value` until ``predicate`` holds; fails with the last value seen."""
        deadline = time.monotonic() + timeout
        current = self.value(expr)
        while not predicate(current):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{expr!r} still {current} after {timeout} s; targets: {self._targets_state()}"
                )
            time.sleep(0.25)
            current = self.value(expr)
        return current

    def _targets_state(self) -> list[tuple[str, str, str]]:
        data = self._api("/api/v1/targets", {"state": "active"})
        return [
            (target["scrapeUrl"], target["health"], target["lastError"])
            for target in data["activeTargets"]
        ]
