"""Bearer-token authentication for one gRPC service, as a server interceptor.

Calls to the protected service must carry ``authorization: Bearer <token>``; any
other service (health, reflection) passes untouched, so orchestrators can probe the
server without the secret.

A refused call never reaches the servicer, and its request is never parsed. It is
observed like every other call (metrics, access log, request id) by the observability
interceptor, which the server places outside this one.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:  # the stubs make these generic; grpc's runtime classes are not
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]

REFUSAL = "this service needs the metadata 'authorization: Bearer <token>' with a valid token"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, token: str, service: str, methods: Iterable[str] | None = None) -> None:
        """``methods``: the names of the methods this token guards; None guards them all."""
        self._expected = f"Bearer {token}".encode()
        self._method_prefix = f"/{service}/"
        self._guarded = (
            None if methods is None else frozenset(self._method_prefix + name for name in methods)
        )

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        # None is an unknown method, which grpc answers UNIMPLEMENTED.
        if handler is None or not handler_call_details.method.startswith(self._method_prefix):
            return handler
        if self._guarded is not None and handler_call_details.method not in self._guarded:
            return handler
        if self._authorized(handler_call_details.invocation_metadata or ()):
            return handler
        return _refusing(handler)

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata:
            if key == "authorization":
                given = value if isinstance(value, bytes) else value.encode()
                # Constant time, so response timing does not reveal how much of a guess matched.
                return hmac.compare_digest(given, self._expected)
        return False


async def _refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(UNAUTHENTICATED, REFUSAL)


def _refusing(handler: Handler) -> Handler:
    """A handler of the same streaming kind as ``handler`` that refuses the call.

    No request deserializer: the request stays bytes nobody reads, so a caller without
    the token cannot make the server parse a 64 MiB message.
    """
    serializer = {"response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_refuse, **serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_refuse, **serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_refuse, **serializer)
    return grpc.unary_unary_rpc_method_handler(_refuse, **serializer)
