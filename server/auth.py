"""Bearer-token authentication for one gRPC service, as a server interceptor.

Calls to the protected service must carry ``authorization: Bearer <token>``; any
other service (health, reflection) passes untouched, so orchestrators can probe the
server without the secret.

A refused prediction call never reaches the servicer, so the interceptor records it the
way the servicer records the calls it answers: in ``visionrpc_requests_total`` and one
access-log line, with status UNAUTHENTICATED and the caller's ``x-request-id`` (or a new
one, sent back in the trailing metadata). The request itself is never read: its model is
recorded as unknown, so a caller without the token cannot grow label values.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc

from .logging_setup import ACCESS_LOGGER, request_log
from .metrics import ServerMetrics
from .service import REQUEST_ID_KEY

if TYPE_CHECKING:  # the stubs make these generic; grpc's runtime classes are not
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]

REFUSAL = "this service needs the metadata 'authorization: Bearer <token>' with a valid token"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED

access_logger = logging.getLogger(ACCESS_LOGGER)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(
        self,
        token: str,
        service: str,
        metrics: ServerMetrics,
        recorded_methods: Iterable[str],
        methods: Iterable[str] | None = None,
    ) -> None:
        """``recorded_methods``: names of ``service``'s methods whose refusals are recorded.

        ``methods``: the names of the methods this token guards; None guards them all.
        """
        self._expected = f"Bearer {token}".encode()
        self._method_prefix = f"/{service}/"
        self._metrics = metrics
        self._recorded = frozenset(self._method_prefix + name for name in recorded_methods)
        self._guarded = (
            None if methods is None else frozenset(self._method_prefix + name for name in methods)
        )

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        started = time.perf_counter()
        handler = await continuation(handler_call_details)
        # None is an unknown method, which grpc answers UNIMPLEMENTED.
        if handler is None or not handler_call_details.method.startswith(self._method_prefix):
            return handler
        if self._guarded is not None and handler_call_details.method not in self._guarded:
            return handler
        metadata = handler_call_details.invocation_metadata or ()
        if self._authorized(metadata):
            return handler
        request_id = _request_id(metadata)
        recorded = handler_call_details.method in self._recorded

        async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            if recorded:
                self._record_refusal(request_id, time.perf_counter() - started)
            await context.abort(
                UNAUTHENTICATED, REFUSAL, trailing_metadata=((REQUEST_ID_KEY, request_id),)
            )

        return _like(handler, refuse)

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata:
            if key == "authorization":
                given = value if isinstance(value, bytes) else value.encode()
                # Constant time, so response timing does not reveal how much of a guess matched.
                return hmac.compare_digest(given, self._expected)
        return False

    def _record_refusal(self, request_id: str, seconds: float) -> None:
        # An empty model name is never a loaded model's, so metrics label it _unknown.
        self._metrics.request_finished("", "", UNAUTHENTICATED.name, 0, seconds)
        request_log(
            access_logger,
            model="",
            version="",
            images=0,
            status=UNAUTHENTICATED.name,
            latency_seconds=seconds,
            request_id=request_id,
        )


def _request_id(metadata: Any) -> str:
    """The caller's ``x-request-id``, or a new one, as the servicer chooses it."""
    for key, value in metadata:
        if key == REQUEST_ID_KEY:
            return str(value)
    return uuid.uuid4().hex


def _like(handler: Handler, behavior: Callable[..., Awaitable[None]]) -> Handler:
    """A handler of the same streaming kind and codecs as ``handler`` that runs ``behavior``."""
    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behavior, **codecs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behavior, **codecs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behavior, **codecs)
    return grpc.unary_unary_rpc_method_handler(behavior, **codecs)
