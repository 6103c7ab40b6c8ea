"""Real servers for tests: in-process on a free loopback port, in the test's loop or a thread."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from visionrpc.server.app import RunningApp, start_app
from visionrpc.server.metrics import ServerMetrics
from visionrpc.server.repository import ModelRepository
from visionrpc.server.settings import ServerSettings

if TYPE_CHECKING:
    from tests.helpers.tls import Certificates

# Quiet, small and quick on a shared 2-core machine; any of these can be overridden.
TEST_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 0,
    "metrics_port": 0,
    "providers": ("CPUExecutionProvider",),
    "intra_op_threads": 1,
    "preprocess_workers": 2,
    "shutdown_grace_seconds": 1.0,
}


@dataclass(frozen=True)
class RunningServer:
    address: str
    # 0 when the metrics endpoint is off (the default; pass metrics=True).
    metrics_port: int
    server: grpc.aio.Server
    app: RunningApp

    @property
    def repository(self) -> ModelRepository:
        return self.app.repository

    @property
    def metrics(self) -> ServerMetrics:
        """The server's own metrics; its ``registry`` reads them without the HTTP endpoint."""
        return self.app.metrics


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def settings_for_tests(repository: Path, metrics: bool = False, **overrides: Any) -> ServerSettings:
    values = {**TEST_DEFAULTS, "repository": repository}
    if metrics:
        values["metrics_port"] = free_port()
    values.update(overrides)
    return ServerSettings(**values)


def tls_settings(directory: Path, certificates: Certificates, *, mutual: bool) -> dict[str, Any]:
    """ServerSettings overrides for TLS with ``certificates``, written as PEM files.

    ``mutual`` also requires clients to present a certificate signed by the test CA.
    """
    contents = {
        "tls_cert": certificates.server.certificate,
        "tls_key": certificates.server.private_key,
    }
    if mutual:
        contents["tls_client_ca"] = certificates.ca.certificate
    paths = {}
    for name, content in contents.items():
        paths[name] = directory / f"{name}.pem"
        paths[name].write_bytes(content)
    return paths


@contextlib.asynccontextmanager
async def running_server(
    repository: Path, metrics: bool = False, **overrides: Any
) -> AsyncIterator[RunningServer]:
    """A started server in the current event loop; ``overrides`` are ServerSettings fields."""
    settings = settings_for_tests(repository, metrics, **overrides)
    app = await start_app(settings)
    try:
        yield RunningServer(
            address=f"127.0.0.1:{app.port}",
            metrics_port=app.metrics_port,
            server=app.server,
            app=app,
        )
    finally:
        await app.stop(settings.shutdown_grace_seconds)


@contextlib.contextmanager
def server_in_thread(
    repository: Path, metrics: bool = False, **overrides: Any
) -> Iterator[RunningServer]:
    """The same server in its own event loop on a daemon thread, for synchronous clients."""
    settings = settings_for_tests(repository, metrics, **overrides)
    loop = asyncio.new_event_loop()
    started: list[RunningServer] = []
    failures: list[BaseException] = []
    ready = threading.Event()
    stop_requested = asyncio.Event()

    async def run() -> None:
        try:
            app = await start_app(settings)
        except BaseException as exc:
            failures.append(exc)
            ready.set()
            return
        started.append(RunningServer(f"127.0.0.1:{app.port}", app.metrics_port, app.server, app))
        ready.set()
        await stop_requested.wait()
        await app.stop(settings.shutdown_grace_seconds)

    thread = threading.Thread(
        target=loop.run_until_complete, args=(run(),), name="test-server", daemon=True
    )
    thread.start()
    ready.wait()
    try:
        if failures:
            raise failures[0]
        yield started[0]
    finally:
        loop.call_soon_threadsafe(stop_requested.set)
        thread.join(timeout=30)
        loop.close()
