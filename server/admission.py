"""Admitting a prediction call from its headers, before its message is read.

A unary call's handler runs only once gRPC has received and parsed its whole message:
for a 6000x4000 photo that is megabytes carried over the connection and copied twice.
So the decision starts when the headers arrive (``Pipeline.admit_unread``):

- When no model has room, this interceptor hands gRPC a handler that reads no request
  and ends the call with RESOURCE_EXHAUSTED and its retry hint at once: gRPC then
  resets the stream, so most of the message is never sent.
- When the client's headers name the message's model (``MODEL_HINT_KEY``, as
  ``visionrpc.client`` does), or when one model serves, the call is given one of its
  queue slots (or refused at once if it is full), and the call's handler finds it in
  ``arrival_slot`` (the interceptor runs in the call's own task,
  before the message is read, and the handler later in the same task). A photo that
  found room when it arrived is then never refused after its megabytes were read
  because small calls took the room meanwhile. The slot is freed when the call's task
  ends, and after ``HOLD_SECONDS`` unless the handler has taken it by then, so a client
  that sends headers and then stalls holds no room.

On the wire a unary call and a client stream look the same, which is why a
client-streaming handler can refuse a unary call without reading it. The interceptor
comes after the token checks in the chain, so a caller without a valid token still gets
UNAUTHENTICATED, never a load answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc

from visionrpc.protos import MODEL_HINT_KEY, VERSION_HINT_KEY

from .errors import VisionRPCError
from .pipeline import ArrivalSlot, Pipeline, arrival_slot
from .service import abort_with_hint, status_of

if TYPE_CHECKING:  # the stubs make these generic; grpc's runtime classes are not
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]

Context = grpc.aio.ServicerContext[Any, Any]

# How long a slot given at arrival waits for the call's message: far longer than a
# 64 MiB message takes on a loopback or a data-centre network, short enough that headers
# without a message cannot keep the queue full.
HOLD_SECONDS = 1.0


class AdmissionInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(
        self, pipeline: Pipeline, methods: Iterable[str], hold_seconds: float = HOLD_SECONDS
    ) -> None:
        """``methods``: full names (``/package.Service/Method``) of unary prediction calls."""
        self._pipeline = pipeline
        self._methods = frozenset(methods)
        self._hold_seconds = hold_seconds

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in self._methods:
            return handler
        try:
            held = self._pipeline.admit_unread(_named(handler_call_details.invocation_metadata))
        except VisionRPCError as refusal:
            return grpc.stream_unary_rpc_method_handler(
                _refuser(refusal),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if held is not None:
            task = asyncio.current_task()
            if task is None:
                raise RuntimeError("a call outside an asyncio task")
            slot = ArrivalSlot(held)
            arrival_slot.set(slot)
            timer = asyncio.get_running_loop().call_later(self._hold_seconds, slot.give_up)

            def ended(_: object) -> None:
                timer.cancel()
                slot.give_up()

            task.add_done_callback(ended)
        return handler


def _named(metadata: Any) -> tuple[str, str | None] | None:
    """The model (and version) the client's hint names, if it sent one."""
    values = {key: value for key, value in metadata or () if isinstance(value, str)}
    model = values.get(MODEL_HINT_KEY)
    if not model:
        return None
    return model, values.get(VERSION_HINT_KEY) or None


def _refuser(
    refusal: VisionRPCError,
) -> Callable[[AsyncIterator[Any], Context], Awaitable[Any]]:
    async def refuse(requests: AsyncIterator[Any], context: Context) -> Any:
        code, message = status_of(refusal)
        await abort_with_hint(context, code, message, refusal)

    return refuse
