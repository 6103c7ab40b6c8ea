"""Refusing a prediction call from its headers, before its message is read.

A unary call's handler runs only once gRPC has received and parsed its whole message:
for a 6000x4000 photo that is megabytes carried over the connection and copied twice,
just to be refused when the queue is full. When no model has room
(``Pipeline.refusal_before_reading``), this interceptor hands gRPC a handler that reads
no request and ends the call with RESOURCE_EXHAUSTED and its retry hint at once: gRPC
then resets the stream, so most of the message is never sent. On the wire a unary call
and a client stream look the same, which is why a client-streaming handler can answer
a unary call.

It comes after the token checks in the chain, so a caller without a valid token still
gets UNAUTHENTICATED, never a load answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc

from .errors import Overloaded
from .pipeline import Pipeline
from .service import abort_with_hint, status_of

if TYPE_CHECKING:  # the stubs make these generic; grpc's runtime classes are not
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]

Context = grpc.aio.ServicerContext[Any, Any]


class EarlyRefusalInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, pipeline: Pipeline, methods: Iterable[str]) -> None:
        """``methods``: full names (``/package.Service/Method``) of unary prediction calls."""
        self._pipeline = pipeline
        self._methods = frozenset(methods)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in self._methods:
            return handler
        refusal = self._pipeline.refusal_before_reading()
        if refusal is None:
            return handler
        return grpc.stream_unary_rpc_method_handler(
            _refuser(refusal),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _refuser(refusal: Overloaded) -> Callable[[AsyncIterator[Any], Context], Awaitable[Any]]:
    async def refuse(requests: AsyncIterator[Any], context: Context) -> Any:
        code, message = status_of(refusal)
        await abort_with_hint(context, code, message, refusal)

    return refuse
