"""The graceful drain: refuse new calls at once, let accepted ones finish, then stop.

grpc.aio's ``server.stop(grace)`` cancels every call that gRPC has received but not yet
handed to a handler, and the client sees CANCELLED, which it never retries. So the app
drains before it stops: ``begin`` makes every call that reaches a handler from then on
fail at once with UNAVAILABLE (which clients retry, on another replica or once this one
is back), while the calls already in a handler run to their real answer; a request
stream (PredictStream, ModelStreamInfer) reads no more requests, the handler answers the
ones it has, and the call ends with UNAVAILABLE. Only when no
call is left in a handler and none has arrived for ``QUIET_SECONDS`` (so gRPC holds
none that it has not handed over yet; waiting at most ``QUIET_WAIT_LIMIT`` for that), or
the grace is spent, does the app call
``server.stop``, which then has nothing of ours to cancel. The refusals carry a retry
hint of ``RETRY_AFTER_SECONDS``: clients wait that long before their retry, which
quiets this server at once and lets the retry find a replica that serves (or this
one, restarted).

``DrainInterceptor`` does the counting and the refusing for every service except those
it exempts (health must keep answering NOT_SERVING; its watches end on their own).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:  # the stubs make these generic; grpc's runtime classes are not
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]

SHUTTING_DOWN = "the server is shutting down; retry on another replica or once it is back"
QUIET_SECONDS = 0.05
QUIET_WAIT_LIMIT = 1.0
RETRY_AFTER_SECONDS = 1.0
PUSHBACK = ("grpc-retry-pushback-ms", str(round(RETRY_AFTER_SECONDS * 1000)))
Context = grpc.aio.ServicerContext[Any, Any]


class Drain:
    """Counts the calls in handlers and knows whether the server is draining."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        # time.monotonic() when a handler last began, refused or not.
        self.last_arrival = 0.0
        # Set when a call runs, so wait_idle knows an idle stretch was interrupted.
        self.in_flight_since_idle = False
        self._started = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        """From now on new calls are refused; the ones in handlers carry on."""
        self.draining = True
        self._started.set()

    async def started(self) -> None:
        """Returns once the drain has begun (streams wait on it to stop reading)."""
        await self._started.wait()

    async def wait_idle(self, timeout: float) -> bool:
        """True once no call is in a handler and none arrived for ``QUIET_SECONDS``
        (callers that ignore the retry hint may never allow that: after
        ``QUIET_WAIT_LIMIT`` seconds without a call in a handler it is enough); False
        if ``timeout`` seconds passed first."""
        deadline = time.monotonic() + timeout
        idle_since: float | None = None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - time.monotonic()))
            if not self._idle.is_set():
                return False
            now = time.monotonic()
            if idle_since is None or self.in_flight_since_idle:
                idle_since, self.in_flight_since_idle = now, False
            quiet_at = min(self.last_arrival + QUIET_SECONDS, idle_since + QUIET_WAIT_LIMIT)
            if now >= quiet_at:
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(min(quiet_at, deadline) - now)

    def refuse(self) -> None:
        """Notes a call refused while draining (it still breaks the quiet)."""
        self.last_arrival = time.monotonic()

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Counts one call as in flight for as long as its handler runs."""
        self.last_arrival = time.monotonic()
        self.in_flight_since_idle = True
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()


class DrainInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every handler (but the exempt services') in ``Drain.call`` and the refusal."""

    def __init__(self, drain: Drain, exempt_services: Iterable[str]) -> None:
        self._drain = drain
        self._exempt = tuple(f"/{service}/" for service in exempt_services)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        # None is an unknown method, which grpc answers UNIMPLEMENTED.
        if handler is None or handler_call_details.method.startswith(self._exempt):
            return handler
        return _wrapped(handler, self._drain)


def _wrapped(handler: Handler, drain: Drain) -> Handler:
    """The same handler, refused while draining and counted while it runs."""
    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    inner: Any
    if handler.response_streaming:
        inner = handler.stream_stream if handler.request_streaming else handler.unary_stream
        # A streaming handler either yields its answers or writes them and returns.
        streaming = inspect.isasyncgenfunction(inner)
        behavior = _streaming(inner, drain) if streaming else _awaited(inner, drain)
        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(behavior, **codecs)
        return grpc.unary_stream_rpc_method_handler(behavior, **codecs)
    inner = handler.stream_unary if handler.request_streaming else handler.unary_unary
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_awaited(inner, drain), **codecs)
    return grpc.unary_unary_rpc_method_handler(_awaited(inner, drain), **codecs)


class _Requests:
    """A call's request stream that ends once the drain begins.

    The handler then answers the requests it has read and returns, as at the end of
    the stream; ``cut`` tells the wrapper to end the call with UNAVAILABLE, since the
    caller may have had more to send. An idle stream so ends at once.
    """

    def __init__(self, requests: AsyncIterator[Any], drain: Drain) -> None:
        self._requests = requests
        self._drain = drain
        self.cut = False

    async def __aiter__(self) -> AsyncIterator[Any]:
        drained = asyncio.ensure_future(self._drain.started())
        try:
            while True:
                reading = asyncio.ensure_future(anext(self._requests, None))
                await asyncio.wait((reading, drained), return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    reading.cancel()
                    self.cut = True
                    return
                request = reading.result()
                if request is None:
                    return
                yield request
        finally:
            drained.cancel()


def _requests_of(request: Any, drain: Drain) -> tuple[Any, _Requests | None]:
    """What the handler gets: a unary request as is, a request stream that ends on drain."""
    if isinstance(request, AsyncIterator):
        stream = _Requests(request, drain)
        return stream.__aiter__(), stream
    return request, None


def _awaited(inner: Callable[..., Any], drain: Drain) -> Callable[..., Awaitable[Any]]:
    async def behavior(request: Any, context: Context) -> Any:
        if drain.draining:
            drain.refuse()
            await _refuse(context)
        given, stream = _requests_of(request, drain)
        with drain.call():
            result = await inner(given, context)
        if stream is not None and stream.cut:
            await _refuse(context)
        return result

    return behavior


def _streaming(inner: Callable[..., AsyncIterator[Any]], drain: Drain) -> Callable[..., Any]:
    async def behavior(request: Any, context: Context) -> AsyncIterator[Any]:
        if drain.draining:
            drain.refuse()
            await _refuse(context)
        given, stream = _requests_of(request, drain)
        with drain.call():
            async for response in inner(given, context):
                yield response
        if stream is not None and stream.cut:
            await _refuse(context)

    return behavior


async def _refuse(context: Context) -> None:
    # Added to what is set already (an observing interceptor's request id).
    metadata = (*(context.trailing_metadata() or ()), PUSHBACK)
    await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN, metadata)
