"""The graceful drain: answer every call received before SIGTERM, refuse later ones, then stop.

grpc.aio's ``server.stop(grace)`` cancels every call that gRPC has received but not yet
handed to a handler, and the client sees CANCELLED, which it never retries. So the app
drains before it stops.

Which calls were received before the signal: grpc.aio takes each call from gRPC core in
its server loop and runs it in a task of its own, and the interceptors run in that task's
first step, before the request message is even read (grpc's ``_handle_rpc``). So the
drain decides in its interceptor, the first code of ours a call reaches: a call that
reached it before ``begin`` is served to its real answer, however long its request takes
to arrive or its handler to run. Calls gRPC core holds but the Python loop has not taken
yet cannot be listed (the loop takes them one at a time per method, a few loop turns
each: about 2.5 ms apiece measured under load on 2 cores; 16 sent together took up to
40 ms, 48 up to 50 ms). They are covered by an accept window, counted in ticks of the
event loop (``TICK_SECONDS`` apart at least): it stays open for ``ACCEPT_MIN_TICKS``
ticks, then for as long as calls keep coming less than ``ACCEPT_GAP_TICKS`` ticks apart
(a backlog being taken), and never past ``ACCEPT_WINDOW_LIMIT`` seconds. Every call that
reaches the interceptor while it is open is served. A tick passes only when the loop
gets to run, so a loop that lags, or a process the kernel keeps off the CPU (a busy
machine, a container's CPU quota), widens the window instead of closing it before the
loop could take what gRPC holds. Once it has closed, every call gets UNAVAILABLE at once
(which clients retry, on another replica or once this one is back) with a retry hint of
``RETRY_AFTER_SECONDS``, which quiets this server and lets the retry find a replica
that serves (or this one, restarted). Too long a window only serves a few more calls
within the grace; too short would turn received calls into UNAVAILABLE.

A request stream (PredictStream, ModelStreamInfer) reads no more requests once the drain
begins, the handler answers the ones it has, and the call ends with UNAVAILABLE. Only
when the window has closed, no call the interceptor saw is left unfinished and none has
arrived for ``QUIET_SECONDS`` (so gRPC holds none that it has not handed over yet;
waiting at most ``QUIET_WAIT_LIMIT`` for that), or the grace is spent, does the app call
``server.stop``, which then has nothing of ours to cancel.

``DrainInterceptor`` does the counting and the refusing for every service except those
it exempts (health must keep answering NOT_SERVING; its watches end on their own).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:  # the stubs make these generic; grpc's runtime classes are not
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]

logger = logging.getLogger(__name__)

SHUTTING_DOWN = "the server is shutting down; retry on another replica or once it is back"
QUIET_SECONDS = 0.05
QUIET_WAIT_LIMIT = 1.0
RETRY_AFTER_SECONDS = 1.0
# The accept window is counted in ticks of the event loop, TICK_SECONDS apart at least: a
# tick passes only when the loop gets to run, so a process the kernel holds off the CPU
# (a busy machine, a container's CPU quota) or a lagging loop closes no window early.
TICK_SECONDS = 0.01
# Covers a call's way from the socket through gRPC core to the Python loop when the loop
# is not backlogged (well under 10 ms measured), with room for a busy machine.
ACCEPT_MIN_TICKS = 5
# Taking one held call costs about 4 loop turns (core's completion, the request task,
# the server loop, the call's task); consecutive ones came up to 9 ms apart, measured.
ACCEPT_GAP_TICKS = 5
ACCEPT_WINDOW_LIMIT = 0.5
PUSHBACK = ("grpc-retry-pushback-ms", str(round(RETRY_AFTER_SECONDS * 1000)))
Context = grpc.aio.ServicerContext[Any, Any]


class Drain:
    """Counts the calls in flight, knows whether the server drains, and which calls to serve."""

    def __init__(self) -> None:
        self.draining = False
        # Calls the interceptor saw whose task has not ended: all, and those served.
        self.in_flight = 0
        self.serving = 0
        # time.monotonic() when a call last reached the interceptor, refused or not, and
        # when one last ended.
        self.last_arrival = 0.0
        self.last_ended = 0.0
        # The accept window: loop ticks since begin, the tick of the last arrival, and
        # what it let in (for the log).
        self.window_open = True
        self.ticks = 0
        self._arrival_tick = 0
        self.accepted_in_window = 0
        self._window_closed = asyncio.Event()
        # Held so the ticking task is not collected (the loop keeps only a weak reference).
        self._ticker: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        self._served_all = asyncio.Event()
        self._served_all.set()

    def begin(self) -> None:
        """From now on calls are refused once the accept window closes; calls received
        before, and in the window, are served."""
        self.draining = True
        self._started.set()
        self._ticker = asyncio.create_task(self._count_ticks(time.monotonic()))

    async def _count_ticks(self, began: float) -> None:
        while time.monotonic() - began < ACCEPT_WINDOW_LIMIT:
            await asyncio.sleep(TICK_SECONDS)
            self.ticks += 1
            if (
                self.ticks >= ACCEPT_MIN_TICKS
                and self.ticks - self._arrival_tick >= ACCEPT_GAP_TICKS
            ):
                break
        self.window_open = False
        self._window_closed.set()
        logger.info(
            "accept window closed after %.0f ms (%d loop ticks): %d calls accepted since the "
            "drain began; refusing new calls",
            (time.monotonic() - began) * 1000,
            self.ticks,
            self.accepted_in_window,
        )

    def admit(self) -> bool:
        """Whether the call arriving now (this task) is served (see the module
        docstring); counts it as in flight until its task, grpc's one per call, which
        runs the interceptors and the handler, is done: also when no handler runs
        because the caller left while its request was on the way."""
        served = self.window_open
        if self.draining:
            self._arrival_tick = self.ticks
            self.accepted_in_window += 1 if served else 0
        self.last_arrival = time.monotonic()
        self.in_flight += 1
        if served:
            self.serving += 1
            self._served_all.clear()
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a call outside an asyncio task")
        task.add_done_callback(lambda _: self._ended(served))
        return served

    def _ended(self, served: bool) -> None:
        self.in_flight -= 1
        self.last_ended = time.monotonic()
        if served:
            self.serving -= 1
            if not self.serving:
                self._served_all.set()

    async def window_closed(self) -> None:
        """Returns once the accept window has closed."""
        await self._window_closed.wait()

    async def started(self) -> None:
        """Returns once the drain has begun (streams wait on it to stop reading)."""
        await self._started.wait()

    async def wait_idle(self, timeout: float) -> bool:
        """True once the accept window has closed, every call served has ended, and the
        refusals have settled: none in flight and none arriving for ``QUIET_SECONDS``
        (callers that ignore the retry hint may never allow that: ``QUIET_WAIT_LIMIT``
        seconds after the last call served it is enough); False if ``timeout`` seconds
        passed first."""
        if timeout <= 0:  # no time to wait for anything (a start that failed)
            return not self.in_flight
        deadline = time.monotonic() + timeout
        try:
            await asyncio.wait_for(self.window_closed(), timeout)
            # No call is served once the window has closed: once set, this stays set.
            if not self._served_all.is_set():
                await asyncio.wait_for(
                    self._served_all.wait(), max(0.0, deadline - time.monotonic())
                )
        except TimeoutError:
            return False
        give_up_at = time.monotonic() + QUIET_WAIT_LIMIT
        while True:
            now = time.monotonic()
            if now >= give_up_at or (
                not self.in_flight and now >= self.last_arrival + QUIET_SECONDS
            ):
                return True
            if now >= deadline:
                return False
            quiet_at = self.last_arrival + QUIET_SECONDS
            # A refusal still in flight is looked at again soon.
            wake_at = quiet_at if not self.in_flight and quiet_at > now else now + TICK_SECONDS
            await asyncio.sleep(min(wake_at, give_up_at, deadline) - now)


class DrainInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts every call (but the exempt services') and refuses those the drain does not
    serve."""

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
        # Decided here, in the call's first step, not once its request has arrived.
        accepted = self._drain.admit()
        return _wrapped(handler, self._drain, accepted)


def _wrapped(handler: Handler, drain: Drain, accepted: bool) -> Handler:
    """The same handler, refused at once unless ``accepted``; its request stream ends
    when the drain begins."""
    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    inner: Any
    if handler.response_streaming:
        inner = handler.stream_stream if handler.request_streaming else handler.unary_stream
        # A streaming handler either yields its answers or writes them and returns.
        streaming = inspect.isasyncgenfunction(inner)
        behavior = (_streaming if streaming else _awaited)(inner, drain, accepted)
        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(behavior, **codecs)
        return grpc.unary_stream_rpc_method_handler(behavior, **codecs)
    inner = handler.stream_unary if handler.request_streaming else handler.unary_unary
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_awaited(inner, drain, accepted), **codecs)
    return grpc.unary_unary_rpc_method_handler(_awaited(inner, drain, accepted), **codecs)


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


def _awaited(
    inner: Callable[..., Any], drain: Drain, accepted: bool
) -> Callable[..., Awaitable[Any]]:
    async def behavior(request: Any, context: Context) -> Any:
        if not accepted:
            await _refuse(context)
        given, stream = _requests_of(request, drain)
        result = await inner(given, context)
        if stream is not None and stream.cut:
            await _refuse(context)
        return result

    return behavior


def _streaming(
    inner: Callable[..., AsyncIterator[Any]], drain: Drain, accepted: bool
) -> Callable[..., Any]:
    async def behavior(request: Any, context: Context) -> AsyncIterator[Any]:
        if not accepted:
            await _refuse(context)
        given, stream = _requests_of(request, drain)
        async for response in inner(given, context):
            yield response
        if stream is not None and stream.cut:
            await _refuse(context)

    return behavior


async def _refuse(context: Context) -> None:
    # Added to what is set already (an observing interceptor's request id).
    metadata = (*(context.trailing_metadata() or ()), PUSHBACK)
    await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN, metadata)
