"""Servers for what the real one only does under load or failure, or cannot show a test.

``scripted_server`` answers ``Predict`` with a scripted list of failure statuses and
then successes, counting attempts and recording metadata: how the client's error
translation and gRPC retry policy are checked for every status code.
``inference_server`` serves a running app's real models through a second gRPC
server that takes test interceptors (``MetadataRecorder``), which the app's own
server does not; the app's server has its own TLS (``tls_settings``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from tests.helpers.server import RunningServer
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.server.pipeline import Pipeline
from visionrpc.server.preprocess import ImageLimits
from visionrpc.server.service import InferenceServicer


class PredictScript:
    """Fails the first calls with the given codes, then answers "scripted" for every image."""

    def __init__(self, failures: Sequence[grpc.StatusCode]) -> None:
        self.failures = list(failures)
        self.attempts = 0

    async def predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PredictResponse:
        self.attempts += 1
        if self.failures:
            code = self.failures.pop(0)
            await context.abort(code, f"scripted {code.name}")
        answer = pb.ImageResult(
            classification=pb.Classification(top=[pb.LabelScore(label="scripted", score=1.0)])
        )
        return pb.PredictResponse(
            model=request.model, version="1", results=[answer for _ in request.images]
        )


@contextlib.asynccontextmanager
async def scripted_server(
    script: PredictScript | Callable[[pb.PredictRequest, Any], Awaitable[pb.PredictResponse]],
) -> AsyncIterator[str]:
    """A gRPC server in the current loop whose Predict follows ``script`` (or is a test's
    own handler); yields its address."""
    predict = script.predict if isinstance(script, PredictScript) else script
    handler = grpc.method_handlers_generic_handler(
        "visionrpc.v1.InferenceService",
        {
            "Predict": grpc.unary_unary_rpc_method_handler(
                predict,
                request_deserializer=pb.PredictRequest.FromString,
                response_serializer=pb.PredictResponse.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


class MetadataRecorder(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Remembers the invocation metadata of every call, by method."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str | bytes]]] = []

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        metadata = dict(handler_call_details.invocation_metadata or ())
        self.calls.append((handler_call_details.method, metadata))
        return await continuation(handler_call_details)


@contextlib.asynccontextmanager
async def inference_server(
    app_server: RunningServer,
    *,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
) -> AsyncIterator[int]:
    """The real servicer over ``app_server``'s loaded models; yields the port on 127.0.0.1.

    ``app_server`` must run in the current event loop (``running_server``), since its
    batchers do.
    """
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-decode")
    pipeline = Pipeline(
        app_server.repository, ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20), executor
    )
    servicer = InferenceServicer(pipeline, app_server.repository, stream_max_in_flight=8)
    server = grpc.aio.server(interceptors=interceptors)
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)
        executor.shutdown(wait=False, cancel_futures=True)
