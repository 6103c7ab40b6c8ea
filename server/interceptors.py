"""One server interceptor that observes every RPC: request id, metrics, access log.

Every call, whatever its service (Inference, health, reflection) and however it ends
(answered, refused by the bearer-token interceptor inside this one, aborted, expired,
cancelled), gets:

- a request id: the caller's ``x-request-id`` (escaped, cut to 128 characters) or a new
  one, in :data:`logging_setup.request_id` for every log record of the call, and sent
  back in the trailing metadata. Never in initial metadata: sending that commits the
  call, and gRPC does not retry a committed call.
- the ``grpc_server_*`` families: started, handled by code, handling time, messages.
- for Predict and PredictStream, the ``visionrpc_*`` request families once per request,
  a stream's requests one by one, including those the stream never answered.
- one access-log line, with the number of images that failed.

An expired or cancelled call ends quietly. gRPC cancels its handler, and what fails on
the way out (a write or an abort on the finished call) is no fault of the server: it is
counted under DEADLINE_EXCEEDED or CANCELLED and logged at DEBUG, not as an ERROR
traceback. Streamed responses are written here rather than yielded to gRPC for the same
reason: a write that fails because the caller left must be caught where it is made.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from visionrpc.protos import inference_pb2 as pb

from . import logging_setup
from .client_text import CLIENT_TEXT_LIMIT, printable
from .metrics import RpcMetrics, ServerMetrics

if TYPE_CHECKING:  # the stubs make these generic; grpc's runtime classes are not
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]

Context = grpc.aio.ServicerContext[Any, Any]

REQUEST_ID_KEY = "x-request-id"
_INFERENCE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
PREDICT_METHODS = frozenset({f"/{_INFERENCE}/Predict", f"/{_INFERENCE}/PredictStream"})
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
# What a caller's id may grow to once escaped (each character at most 10): still a
# small trailer.
_REQUEST_ID_LIMIT = CLIENT_TEXT_LIMIT

access_logger = logging.getLogger(logging_setup.ACCESS_LOGGER)
logger = logging.getLogger(__name__)

# A model name and a requested version to the version a failed request was for.
VersionResolver = Callable[[str, str], str]


def rpc_type(handler: Handler) -> str:
    """The ``grpc_type`` label value, as go-grpc-prometheus spells it."""
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(
        self,
        metrics: ServerMetrics,
        resolve_version: VersionResolver,
        services: Iterable[ServiceDescriptor] = (),
    ) -> None:
        """``services``: their methods' series start at zero instead of at the first call."""
        self._metrics = metrics
        self._resolve_version = resolve_version
        self._rpcs: dict[str, RpcMetrics] = {}
        for service in services:
            for method in service.methods:
                streaming = (method.client_streaming, method.server_streaming)
                kind = {
                    (False, False): "unary",
                    (True, False): "client_stream",
                    (False, True): "server_stream",
                    (True, True): "bidi_stream",
                }[streaming]
                self._rpcs[f"/{service.full_name}/{method.name}"] = metrics.for_rpc(
                    kind, service.full_name, method.name
                )

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            # An unknown method, which gRPC answers UNIMPLEMENTED; a name a caller made up
            # must not become a label value.
            return handler
        method = handler_call_details.method
        rpc = self._rpcs.get(method)
        if rpc is None:
            service, _, name = method.lstrip("/").partition("/")
            rpc = self._rpcs[method] = self._metrics.for_rpc(rpc_type(handler), service, name)
        ledger = (
            _PredictLedger(self._metrics, self._resolve_version)
            if method in PREDICT_METHODS
            else None
        )
        call = _Call(method, rpc, _request_id(handler_call_details.invocation_metadata), ledger)
        return _observed(handler, call)


class _Call:
    """One RPC being observed, from its handler's start to its status."""

    def __init__(
        self, method: str, rpc: RpcMetrics, request_id: str, ledger: _PredictLedger | None
    ) -> None:
        self.method = method
        self.rpc = rpc
        self.request_id = request_id
        self.ledger = ledger
        self.started = time.perf_counter()

    def begin(self, context: Context) -> None:
        # gRPC runs each call's handler in a task of its own, so the value set here is
        # the call's alone, and tasks the handler starts inherit it.
        logging_setup.request_id.set(self.request_id)
        # Trailing metadata set now survives an abort, which keeps it unless given its own.
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))
        self.rpc.started()

    def end(self, context: Context, error: BaseException | None) -> bool:
        """Records the call's outcome; True when ``error`` is to be kept from gRPC's log."""
        code, quiet = _outcome(context, error)
        if quiet:
            logger.debug("call %s ended after it expired: %r", self.method, error)
        seconds = time.perf_counter() - self.started
        self.rpc.handled(code, seconds)
        fields: dict[str, object] = {}
        if self.ledger is not None:
            fields = self.ledger.call_ended(code)
        logging_setup.request_log(
            access_logger,
            method=self.method,
            status=code,
            latency_seconds=seconds,
            request_id=self.request_id,
            **fields,
        )
        return quiet


def _outcome(context: Context, error: BaseException | None) -> tuple[str, bool]:
    """The status name a call ended with, and whether its error is only its expiry."""
    if error is None:
        code = context.code()
        return (grpc.StatusCode.OK if code is None else code).name, False
    if isinstance(error, grpc.aio.AbortError):
        code = context.code()
        return (grpc.StatusCode.UNKNOWN if code is None else code).name, False
    ended = _ended_code(context)
    if isinstance(error, asyncio.CancelledError):
        return (grpc.StatusCode.CANCELLED if ended is None else ended).name, False
    if ended is not None:
        return ended.name, True
    # Anything else escaped the servicer, which answers its own errors: gRPC logs it and
    # the caller sees UNKNOWN.
    return grpc.StatusCode.UNKNOWN.name, False


def _ended_code(context: Context) -> grpc.StatusCode | None:
    """DEADLINE_EXCEEDED or CANCELLED for a call that ended under its handler, else None."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if context.cancelled():
        return grpc.StatusCode.CANCELLED
    return None


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and value:
            # Metadata values are ASCII; escaping keeps what the caller sent readable.
            return printable(value[:_REQUEST_ID_LIMIT], _REQUEST_ID_LIMIT)
    return uuid.uuid4().hex


def _observed(handler: Handler, call: _Call) -> Handler:
    """``handler`` with ``call`` observing it, of the same streaming kind and codecs."""
    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    ledger = call.ledger

    async def run(context: Context, work: Awaitable[Any]) -> Any:
        call.begin(context)
        try:
            result = await work
        except BaseException as error:
            if call.end(context, error):
                # gRPC logs a handler's CancelledError at DEBUG, as the cancellation it is.
                raise asyncio.CancelledError() from None
            raise
        call.end(context, None)
        return result

    async def counted(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            call.rpc.received()
            if ledger is not None:
                ledger.arrived(request)
            yield request

    async def written(responses: AsyncIterator[Any], context: Context) -> None:
        try:
            async for response in responses:
                if ledger is not None:
                    ledger.answered(response)
                await context.write(response)
                call.rpc.sent()
        finally:
            # Closing runs the handler's own cleanup now, not when it is collected.
            aclose = getattr(responses, "aclose", None)
            if aclose is not None:
                await aclose()

    if handler.unary_unary is not None:
        unary_unary: Any = handler.unary_unary

        async def answer(request: Any, context: Context) -> Any:
            response = await unary_unary(request, context)
            if ledger is not None:
                ledger.answered(response)
            return response

        async def observed_unary_unary(request: Any, context: Context) -> Any:
            call.rpc.received()
            if ledger is not None:
                ledger.arrived(request)
            response = await run(context, answer(request, context))
            call.rpc.sent()
            return response

        return grpc.unary_unary_rpc_method_handler(observed_unary_unary, **codecs)

    if handler.stream_unary is not None:
        stream_unary: Any = handler.stream_unary

        async def observed_stream_unary(requests: AsyncIterator[Any], context: Context) -> Any:
            response = await run(context, stream_unary(counted(requests), context))
            call.rpc.sent()
            return response

        return grpc.stream_unary_rpc_method_handler(observed_stream_unary, **codecs)

    if handler.unary_stream is not None:
        unary_stream: Any = handler.unary_stream

        async def observed_unary_stream(request: Any, context: Context) -> None:
            call.rpc.received()
            await run(context, _respond(unary_stream(request, context), context, written))

        return grpc.unary_stream_rpc_method_handler(observed_unary_stream, **codecs)

    stream_stream: Any = handler.stream_stream

    async def observed_stream_stream(requests: AsyncIterator[Any], context: Context) -> None:
        await run(context, _respond(stream_stream(counted(requests), context), context, written))

    return grpc.stream_stream_rpc_method_handler(observed_stream_stream, **codecs)


async def _respond(
    responses: Any,
    context: Context,
    written: Callable[[AsyncIterator[Any], Context], Awaitable[None]],
) -> None:
    """Runs a streaming handler: an async generator's responses are written here; a
    handler that writes its own (health's Watch) is awaited."""
    if isinstance(responses, AsyncIterator):
        await written(responses, context)
    else:
        await responses


class _PredictLedger:
    """The Predict requests of one call, each counted once: answered, or left when it ended.

    Only requests the server received count: a stream refused or expired before its
    first request was read shows in ``grpc_server_handled_total`` alone.

    A stream answers out of order, so an answer finds its request by model and the
    request's own ``request_id`` field (first come, first matched among equal keys).
    """

    def __init__(self, metrics: ServerMetrics, resolve_version: VersionResolver) -> None:
        self._metrics = metrics
        self._resolve_version = resolve_version
        self._pending: dict[tuple[str, str], deque[_Request]] = {}
        self._first_model: str | None = None
        self._last_version = ""
        self._requests = 0
        self._images = 0
        self._failed_images = 0

    def arrived(self, request: Any) -> None:
        if isinstance(request, pb.PredictRequest):
            model, version, images = request.model, request.version, len(request.images)
            key = (request.model, request.request_id)
        else:  # refused before it was parsed: nothing the caller sent is read
            model, version, images, key = "", "", 0, ("", "")
        if self._first_model is None:
            self._first_model = model
        self._requests += 1
        self._images += images
        self._pending.setdefault(key, deque()).append(
            _Request(model, version, images, time.perf_counter())
        )
        self._metrics.request_started(model)

    def answered(self, response: Any) -> None:
        if not isinstance(response, pb.PredictResponse):
            return
        request = self._take((response.model, response.request_id))
        if request is None:
            return
        if response.HasField("error"):
            code = _CODE_NAMES.get(response.error.code, grpc.StatusCode.UNKNOWN.name)
            self._failed(request, code)
            return
        version = response.version
        self._last_version = version
        self._metrics.request_finished(
            request.model, version, "OK", request.images, time.perf_counter() - request.started
        )
        for result in response.results:
            code = "OK"
            if result.HasField("error"):
                code = _CODE_NAMES.get(result.error.code, grpc.StatusCode.UNKNOWN.name)
                self._failed_images += 1
            self._metrics.image_finished(request.model, version, code)

    def call_ended(self, code: str) -> dict[str, object]:
        """Requests the call never answered take its status; the access-log fields."""
        leftover_code = grpc.StatusCode.CANCELLED.name if code == "OK" else code
        for queue in self._pending.values():
            while queue:
                self._failed(queue.popleft(), leftover_code)
        return {
            "model": printable(self._first_model or ""),
            "version": printable(self._last_version),
            "requests": self._requests,
            "images": self._images,
            "failed_images": self._failed_images,
        }

    def _take(self, key: tuple[str, str]) -> _Request | None:
        queue = self._pending.get(key)
        if queue:
            return queue.popleft()
        # An answer whose model the servicer spelled differently: the oldest request.
        for queue in self._pending.values():
            if queue:
                return queue.popleft()
        return None

    def _failed(self, request: _Request, code: str) -> None:
        version = self._resolve_version(request.model, request.version)
        self._last_version = version
        self._failed_images += request.images
        self._metrics.request_finished(
            request.model, version, code, request.images, time.perf_counter() - request.started
        )


class _Request:
    __slots__ = ("images", "model", "started", "version")

    def __init__(self, model: str, version: str, images: int, started: float) -> None:
        self.model = model
        self.version = version
        self.images = images
        self.started = started
