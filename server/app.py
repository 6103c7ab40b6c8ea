"""Wires the server together, in order, and runs it until SIGTERM or SIGINT.

Order: load the repository (sessions and warm-up), the servicer, ``grpc.health.v1``
(overall ``""``, ``visionrpc.v1.Inference``, and one service per model under the
model's name), reflection, message-size limits, port, start, the Prometheus endpoint.
On a signal: health turns NOT_SERVING, new calls are refused, in-flight calls get
``shutdown_grace_seconds`` to finish, then the batchers close.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

# The asyncio servicer that grpc_health.v1.health exposes as `aio`, which its stubs omit.
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection

from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc

from .pipeline import Pipeline
from .preprocess import ImageLimits
from .repository import ModelRepository, load_repository
from .runtime import RuntimeOptions
from .service import InferenceServicer
from .settings import ServerSettings

logger = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class RunningApp:
    server: grpc.aio.Server
    # The bound ports (useful when the settings asked for port 0); metrics 0 when off.
    port: int
    metrics_port: int
    repository: ModelRepository
    health: AsyncHealthServicer
    _decode_executor: ThreadPoolExecutor
    _metrics_server: Any

    async def stop(self, grace_seconds: float) -> None:
        """Refuse new calls, give in-flight ones the grace period, then release everything."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_seconds)
        await self.repository.close()
        self._decode_executor.shutdown(wait=False, cancel_futures=True)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()


async def start_app(settings: ServerSettings) -> RunningApp:
    repository = await asyncio.to_thread(
        load_repository,
        settings.repository,
        RuntimeOptions(
            providers=settings.providers,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
        ),
        settings.default_batching,
    )
    decode_executor = ThreadPoolExecutor(
        max_workers=settings.preprocess_workers or None, thread_name_prefix="decode"
    )
    pipeline = Pipeline(
        repository,
        ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels),
        decode_executor,
    )
    servicer = InferenceServicer(
        pipeline, repository, stream_max_in_flight=settings.stream_max_in_flight
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
        ]
    )
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    health_servicer = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names = ["", INFERENCE_SERVICE, *repository.names()]
    # A model that failed to load answers NOT_SERVING rather than "unknown service".
    failed_only = {f.model for f in repository.failures} - set(repository.names())
    for name in [*service_names, *sorted(failed_only)]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc's way of saying the address is taken or invalid
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    await server.start()
    metrics_server, metrics_port = None, 0
    if settings.metrics_port:
        metrics_server, _ = prometheus_client.start_http_server(
            settings.metrics_port, addr=settings.host
        )
        metrics_port = settings.metrics_port
    for name in service_names:
        if name in ("", INFERENCE_SERVICE) and not repository.names():
            continue
        await health_servicer.set(name, SERVING)
    _log_startup(repository, address, port, metrics_port)
    return RunningApp(
        server=server,
        port=port,
        metrics_port=metrics_port,
        repository=repository,
        health=health_servicer,
        _decode_executor=decode_executor,
        _metrics_server=metrics_server,
    )


async def serve(settings: ServerSettings) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully; returns the exit code."""
    app = await start_app(settings)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    await stop_requested.wait()
    logger.info("shutting down: in-flight calls get up to %.1f s", settings.shutdown_grace_seconds)
    await app.stop(settings.shutdown_grace_seconds)
    logger.info("stopped")
    return 0


def _log_startup(repository: ModelRepository, address: str, port: int, metrics_port: int) -> None:
    for model in repository.loaded():
        batching = model.batching
        logger.info(
            "model %s version %d: provider %s, max_batch_size %d, max_queue_delay_ms %g, "
            "max_queue_size %d, instances %d, warm-up %.3f s",
            model.name,
            model.version,
            model.runtime.provider,
            batching.max_batch_size,
            batching.max_queue_delay_ms,
            batching.max_queue_size,
            batching.instances,
            model.runtime.warmup_seconds,
        )
    for failure in repository.failures:
        logger.warning("not serving %s: %s: %s", failure.model, failure.path, failure.reason)
    if not repository.names():
        logger.warning("no model loaded: health reports NOT_SERVING")
    metrics = f"metrics on port {metrics_port}" if metrics_port else "metrics off"
    logger.info("serving on %s (port %d), %s", address, port, metrics)
