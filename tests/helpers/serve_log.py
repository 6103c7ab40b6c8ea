"""``visionrpc serve`` as a real subprocess whose JSON log is collected line by line as it runs.

For lifecycle tests that watch the log while the process starts, drains and exits
(``serve_process`` in the sibling module reads it after the fact)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.helpers.server import free_port

SERVE_COMMAND = [
    sys.executable, "-m", "visionrpc.cli", "serve",
    "--metrics-port", "0", "--providers", "CPUExecutionProvider", "--log-format", "json",
    "--intra-op-threads", "1", "--preprocess-workers", "1",
]  # fmt: skip


class ServeProcess:
    """One server process; ``lines`` fills from its stdout on a reader thread."""

    def __init__(self, repository: Path, port: int, flags: tuple[str, ...]) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [*SERVE_COMMAND, "--repository", str(repository), "--port", str(port), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        """Until a log line contains ``text``; fails with the log if the process ends first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(text in line for line in self.lines):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"no log line with {text!r}:\n{''.join(self.lines)}")
                self._changed.wait(0.1)

    def wait_until_serving(self) -> None:
        self.wait_for('"message": "serving on ')

    def sigterm(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def exit_code(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def records(self) -> list[dict[str, Any]]:
        found = []
        for line in list(self.lines):
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
        return found

    def access_log(self, request_id: str | None = None) -> list[dict[str, Any]]:
        """The access-log entries of Predict calls (one per call a handler began, refused
        ones included), optionally of one request id."""
        return [
            record
            for record in self.records()
            if record.get("message") == "call"
            and str(record.get("method", "")).endswith("/Predict")
            and (request_id is None or record.get("request_id") == request_id)
        ]

    def log_text(self) -> str:
        return "".join(self.lines)


@contextlib.contextmanager
def serve_process(repository: Path, *flags: str, port: int | None = None) -> Iterator[ServeProcess]:
    """A started (not necessarily loaded) server; killed at the end if still running."""
    server = ServeProcess(repository, free_port() if port is None else port, flags)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
        server.process.wait(timeout=30)
