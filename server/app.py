"""Wires the server together, in order, and runs it until SIGTERM or SIGINT.

Order: the metrics, the servicers (visionrpc.v1 and the Open Inference Protocol's
``inference.GRPCInferenceService``, one pipeline under both) over a repository that is
still loading,
``grpc.health.v1`` (overall ``""``, ``visionrpc.v1.InferenceService``, and one service per
model under the model's name, all NOT_SERVING), reflection, the bearer-token
interceptor and message-size limits, the port (TLS when configured), start, the
Prometheus endpoint; then the model manager loads the models (sessions and warm-up) and
turns health SERVING, and with ``--model-control poll`` keeps rescanning the repository
(``ModelControlService`` is added only with ``--model-control-api on``). Listening first
lets orchestrators see a live process that is not ready yet (instead of a refused
connection) while models load, and scrape it meanwhile.
On a signal: the drain (``drain.py``) serves every call received before it (and those
gRPC still held, within a short accept window) to its real answer and refuses later ones
with UNAVAILABLE at once, health turns NOT_SERVING and health watches end once told so,
idle PredictStreams end; the calls get up to ``shutdown_grace_seconds`` to finish; only
then does the gRPC server stop, and the batchers close.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.protos import model_control_pb2, model_control_pb2_grpc
from visionrpc.protos.inference import grpc_predict_v2_pb2 as v2
from visionrpc.protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc

from .admission import AdmissionInterceptor
from .auth import BearerTokenInterceptor
from .cpus import (
    DECODE_THREAD,
    SMALL_DECODE_THREAD,
    lower_this_thread,
    plan_threads,
    usable_cpus,
)
from .drain import Drain, DrainInterceptor
from .errors import VisionRPCError
from .health import NOT_SERVING, SERVING, HealthServicer
from .interceptors import ObservabilityInterceptor
from .memory import ARENAS, IdleTrimmer
from .metrics import ServerMetrics
from .model_control import ModelControlServicer
from .model_manager import ControlMode, ModelManager
from .oip import CONTROL_METHODS as OIP_CONTROL_METHODS
from .oip import INFERENCE_METHODS as OIP_INFERENCE_METHODS
from .oip import SERVICE_NAME as OPEN_INFERENCE_SERVICE
from .oip import OpenInferenceServicer, reflection_pool
from .pipeline import Pipeline
from .preprocess import ImageLimits
from .reflection import enable_reflection
from .repository import ModelRepository, model_folders
from .runtime import CUDA, ModelLoadError, RuntimeOptions, choose_providers, lane_count
from .service import InferenceServicer
from .settings import ServerSettings, TLSFiles

logger = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
MODEL_CONTROL_SERVICE = model_control_pb2.DESCRIPTOR.services_by_name[
    "ModelControlService"
].full_name


@dataclass
class RunningApp:
    server: grpc.aio.Server
    # The bound ports (useful when the settings asked for port 0); metrics 0 when off.
    port: int
    metrics_port: int
    repository: ModelRepository
    models: ModelManager
    health: HealthServicer
    metrics: ServerMetrics
    drain: Drain
    _decode_executors: tuple[ThreadPoolExecutor, ...]
    _metrics_server: Any
    # Hands free heap memory back after bursts (memory.py); None when turned off.
    _trimming: asyncio.Task[None] | None = None

    def start_trimming(self, idle_seconds: float, kept_bytes: int) -> None:
        trimmer = IdleTrimmer(self.drain, idle_seconds, kept_bytes)
        self._trimming = asyncio.create_task(trimmer.run(), name="idle-trim")

    async def stop(self, grace_seconds: float) -> None:
        """Refuse new calls, let the ones received finish within the grace, then stop.

        ``server.stop`` comes last because it cancels the calls gRPC holds but has not
        handed to a handler yet; by then the drain has answered every one of ours.
        """
        deadline = time.monotonic() + grace_seconds
        self.drain.begin()
        await self.models.close()
        await self.health.enter_graceful_shutdown()
        if not await self.drain.wait_idle(grace_seconds):
            logger.warning(
                "%d calls still running after the %.1f s grace are cancelled",
                self.drain.in_flight,
                grace_seconds,
            )
        await self.server.stop(max(0.0, deadline - time.monotonic()))
        if self._trimming is not None:
            self._trimming.cancel()
        await self.repository.close()
        for executor in self._decode_executors:
            executor.shutdown(wait=False, cancel_futures=True)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()


async def start_app(settings: ServerSettings) -> RunningApp:
    # Read before the slow model loading, so a wrong path fails at once.
    tls = settings.read_tls_files()
    auth_token = settings.read_auth_token()
    control_token = settings.read_model_control_token()
    metrics = ServerMetrics()
    repository = ModelRepository(loading=True)
    threads = plan_threads(
        usable_cpus(),
        on_gpu=_models_on_gpu(settings),
        intra_op_threads=settings.intra_op_threads,
        preprocess_workers=settings.preprocess_workers,
    )
    decode_executor, small_decode_executor = (
        ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix=name,
            initializer=lower_this_thread,
            initargs=(settings.decode_niceness, name),
        )
        # One more thread for small images, so photos in the pool never hold them up.
        for name, workers in ((DECODE_THREAD, threads.preprocess_workers), (SMALL_DECODE_THREAD, 1))
    )
    pipeline = Pipeline(
        repository,
        ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels),
        decode_executor,
        metrics,
        max_images_per_request=settings.max_images_per_request,
        decode_backlog_bytes=settings.decode_backlog_bytes,
        decode_threads=threads.preprocess_workers,
        small_decode_executor=small_decode_executor,
    )
    drain = Drain()
    servicer = InferenceServicer(
        pipeline, repository, stream_max_in_flight=settings.stream_max_in_flight
    )
    observability = ObservabilityInterceptor(
        metrics,
        _version_resolver(repository),
        (
            pb.DESCRIPTOR.services_by_name["InferenceService"],
            v2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
            health_pb2.DESCRIPTOR.services_by_name["Health"],
        ),
    )
    # The first interceptor wraps the others, so calls refused for their token, or
    # because the server drains, are observed like any other. The drain's comes next:
    # a call refused while draining costs nothing else. Both prediction APIs need the
    # token, health does not (and keeps answering NOT_SERVING while draining).
    interceptors: list[Any] = [
        observability,
        DrainInterceptor(drain, exempt_services=(health.SERVICE_NAME,)),
    ]
    if auth_token is not None:
        interceptors += [
            BearerTokenInterceptor(auth_token, INFERENCE_SERVICE),
            BearerTokenInterceptor(
                auth_token, OPEN_INFERENCE_SERVICE, methods=OIP_INFERENCE_METHODS
            ),
        ]
    if settings.model_control_api == "on" and control_token is not None:
        # Its own token: a client trusted to predict is not thereby trusted to unload.
        interceptors += [
            BearerTokenInterceptor(control_token, MODEL_CONTROL_SERVICE),
            BearerTokenInterceptor(
                control_token, OPEN_INFERENCE_SERVICE, methods=OIP_CONTROL_METHODS
            ),
        ]
    # Last, so that only a call that passed the token checks is refused for load.
    interceptors.append(
        AdmissionInterceptor(
            pipeline,
            (f"/{INFERENCE_SERVICE}/Predict", f"/{OPEN_INFERENCE_SERVICE}/ModelInfer"),
        )
    )
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            *settings.connection_options(),
        ],
    )
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", INFERENCE_SERVICE, *(p.name for p in model_folders(settings.repository))]:
        await health_servicer.set(name, NOT_SERVING)
    runtime_options = RuntimeOptions(
        providers=settings.providers,
        intra_op_threads=threads.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        allow_spinning=settings.intra_op_spinning == "on",
        model_niceness=settings.model_niceness,
        cpu_lanes=settings.cpu_lanes == "on",
    )

    async def serving_changed(model: str, serving: bool) -> None:
        """Health follows the repository: per model, and the server while any model serves."""
        await health_servicer.set(model, SERVING if serving else NOT_SERVING)
        overall = SERVING if repository.names() else NOT_SERVING
        for name in ("", INFERENCE_SERVICE):
            await health_servicer.set(name, overall)

    manager = ModelManager(
        repository,
        settings.repository,
        runtime_options,
        settings.default_batching,
        mode=ControlMode(settings.model_control),
        metrics=metrics,
        on_serving_changed=serving_changed,
    )
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(
        OpenInferenceServicer(
            pipeline,
            repository,
            health_servicer,
            manager,
            model_control=settings.model_control_api == "on",
            stream_max_in_flight=settings.stream_max_in_flight,
        ),
        server,
    )
    services = [
        INFERENCE_SERVICE,
        OPEN_INFERENCE_SERVICE,
        health.SERVICE_NAME,
    ]
    if settings.model_control_api == "on":
        model_control_pb2_grpc.add_ModelControlServiceServicer_to_server(
            ModelControlServicer(manager), server
        )
        services.append(MODEL_CONTROL_SERVICE)
    served_files = [pb.DESCRIPTOR, model_control_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR]
    # Reflection answers as grpc.reflection.v1 and v1alpha (see reflection.py).
    enable_reflection(server, services, reflection_pool([*served_files, reflection_pb2.DESCRIPTOR]))
    address = f"{settings.host}:{settings.port}"
    try:
        port = _add_port(server, address, tls)
    except RuntimeError as exc:  # grpc's way of saying the address is taken or invalid
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    metrics_server, metrics_port = None, 0
    if settings.metrics_port:
        metrics_server, _ = metrics.start_http_server(settings.host, settings.metrics_port)
        metrics_port = metrics_server.server_port
    await server.start()
    app = RunningApp(
        server=server,
        port=port,
        metrics_port=metrics_port,
        repository=repository,
        models=manager,
        health=health_servicer,
        metrics=metrics,
        drain=drain,
        _decode_executors=(decode_executor, small_decode_executor),
        _metrics_server=metrics_server,
    )
    logger.info("listening on %s (port %d), loading models", address, port)
    lanes = lane_count(runtime_options, _planned_providers(settings))
    logger.info(
        "%d usable CPUs: %d onnxruntime intra-op threads (spinning %s; %s), %d decode threads "
        "(and one for small images)",
        threads.cpus,
        threads.intra_op_threads,
        settings.intra_op_spinning,
        f"{lanes} single-thread lanes on CPU" if lanes else "no lanes",
        threads.preprocess_workers,
    )
    try:
        await manager.start(settings.load_model)
    except BaseException:
        await app.stop(0)
        raise
    if manager.mode is ControlMode.POLL:
        manager.start_polling(settings.poll_interval_seconds)
    if settings.malloc_idle_trim_seconds > 0:
        # Started once the models are in: their memory is not what a trim is for.
        app.start_trimming(
            settings.malloc_idle_trim_seconds, ARENAS * settings.malloc_trim_threshold_bytes
        )
    _log_startup(repository, address, port, metrics_port)
    logger.info(
        "model control %s%s, model-control API %s",
        settings.model_control,
        f" (every {settings.poll_interval_seconds:g} s)"
        if manager.mode is ControlMode.POLL
        else "",
        "off"
        if settings.model_control_api == "off"
        else "on, bearer token required"
        if control_token is not None
        else "on, no token",
    )
    logger.info(
        "%s, %s",
        "plaintext" if tls is None else "mutual TLS" if tls.client_ca else "TLS",
        "no authentication" if auth_token is None else "bearer token required for Inference",
    )
    return app


def _version_resolver(repository: ModelRepository) -> Callable[[str, str], str]:
    """The version a failed request was for: the newest when it named none and the model
    is known, else what it asked for."""

    def resolve(model: str, version: str) -> str:
        try:
            return str(repository.get(model, version or None).version)
        except VisionRPCError:
            return version

    return resolve


def _models_on_gpu(settings: ServerSettings) -> bool:
    """Whether sessions will ask for CUDA first."""
    return _planned_providers(settings)[:1] == [CUDA]


def _planned_providers(settings: ServerSettings) -> list[str]:
    """The providers sessions will ask for; none where one is missing (that fails at load)."""
    try:
        return choose_providers(settings.providers)
    except ModelLoadError:
        return []


def _add_port(server: grpc.aio.Server, address: str, tls: TLSFiles | None) -> int:
    if tls is None:
        return server.add_insecure_port(address)
    credentials = grpc.ssl_server_credentials(
        [(tls.private_key, tls.certificate_chain)],
        root_certificates=tls.client_ca,
        require_client_auth=tls.client_ca is not None,
    )
    return server.add_secure_port(address, credentials)


async def serve(settings: ServerSettings) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully; returns the exit code."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Installed before loading, so a SIGTERM that arrives while models load still ends in a
    # graceful stop (once loading returns) rather than the default handler's abrupt exit.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    app = await start_app(settings)
    # What is alive now (modules, servicers, the models' Python side) lasts as long as the
    # server. Frozen, it is skipped by the collector's full passes, which otherwise walk it
    # all and stall the event loop: 19-26 ms a pass, measured under overload on 2 cores.
    gc.collect()
    gc.freeze()
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
            extra={
                "model": model.name,
                "version": str(model.version),
                "provider": model.runtime.provider,
                "max_batch_size": batching.max_batch_size,
                "max_queue_delay_ms": batching.max_queue_delay_ms,
                "max_queue_size": batching.max_queue_size,
                "instances": batching.instances,
                "warmup_seconds": round(model.runtime.warmup_seconds, 3),
            },
        )
    for failure in repository.failures:
        logger.warning("not serving %s: %s: %s", failure.model, failure.path, failure.reason)
    if not repository.names():
        logger.warning("no model loaded: health reports NOT_SERVING")
    metrics = f"metrics on port {metrics_port}" if metrics_port else "metrics off"
    logger.info("serving on %s (port %d), %s", address, port, metrics)
