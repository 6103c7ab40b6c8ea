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
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos.inference import grpc_predict_v2_pb2 as v2

from . import logging_setup
from .client_text import CLIENT_TEXT_LIMIT, printable
from .metrics import RpcMetrics, ServerMetrics

if TYPE_CHECKING:  # the stubs make these generic; grpc's runtime classes are not
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]

Context = grpc.aio.ServicerContext[Any, Any]

REQUEST_ID_KEY = "x-request-id"
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_CODE_NAME_SET = frozenset(_CODE_NAMES.values())
# What a caller's id may grow to once escaped (each character at most 10): still a
# small trailer.
_REQUEST_ID_LIMIT = CLIENT_TEXT_LIMIT

access_logger = logging.getLogger(logging_setup.ACCESS_LOGGER)
logger = logging.getLogger(__name__)

# A model name and a requested version to the version a failed request was for.
VersionResolver = Callable[[str, str], str]


def rpc_type(request_streaming: bool, response_streaming: bool) -> str:
    """The ``grpc_type`` label value, as go-grpc-prometheus spells it."""
    return {
        (False, False): "unary",
        (True, False): "client_stream",
        (False, True): "server_stream",
        (True, True): "bidi_stream",
    }[request_streaming, response_streaming]


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
                kind = rpc_type(method.client_streaming, method.server_streaming)
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
            kind = rpc_type(handler.request_streaming, handler.response_streaming)
            rpc = self._rpcs[method] = self._metrics.for_rpc(kind, service, name)
        messages = PREDICTION_METHODS.get(method)
        ledger = (
            None
            if messages is None
            else _PredictLedger(self._metrics, self._resolve_version, messages)
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


class _Asked(NamedTuple):
    """What one prediction request asked for, read from its message."""

    key: tuple[str, str]
    model: str
    version: str
    images: int


class _Answer(NamedTuple):
    """What one prediction answer says: its request's key, version, and each image's code,
    or the request's own error code."""

    key: tuple[str, str]
    version: str
    error: str | None
    image_codes: list[str]


class _Messages(NamedTuple):
    """How to read one protocol's prediction messages."""

    asked: Callable[[Any], _Asked]
    answer: Callable[[Any], _Answer | None]


def _visionrpc_asked(request: pb.PredictRequest) -> _Asked:
    return _Asked(
        (request.model, request.request_id), request.model, request.version, len(request.images)
    )


def _visionrpc_answer(response: pb.PredictResponse) -> _Answer:
    key = (response.model, response.request_id)
    if response.HasField("error"):
        return _Answer(key, response.version, _code_name(response.error.code), [])
    codes = [
        _code_name(result.error.code) if result.HasField("error") else "OK"
        for result in response.results
    ]
    return _Answer(key, response.version, None, codes)


def _open_inference_asked(request: v2.ModelInferRequest) -> _Asked:
    # One image per row of the one input tensor; a malformed request counts none.
    images = 0
    if len(request.inputs) == 1 and request.inputs[0].shape:
        images = max(0, int(request.inputs[0].shape[0]))
    return _Asked(
        (request.model_name, request.id), request.model_name, request.model_version, images
    )


def _open_inference_answer(response: v2.ModelInferResponse) -> _Answer:
    """Image codes from the ``error`` output: ``"<STATUS>: ..."`` rows, empty for good ones."""
    codes: list[str] = []
    for index, output in enumerate(response.outputs):
        if output.name == "error" and index < len(response.raw_output_contents):
            codes = [
                row.split(":", 1)[0] if row else "OK"
                for row in _bytes_rows(response.raw_output_contents[index])
            ]
    if not codes:
        codes = ["OK"] * (response.outputs[0].shape[0] if response.outputs else 0)
    return _Answer((response.model_name, response.id), response.model_version, None, codes)


def _open_inference_stream_answer(response: v2.ModelStreamInferResponse) -> _Answer:
    if response.error_message:
        # "<STATUS>: <why>", with no model or id to match: the oldest request takes it.
        code = response.error_message.split(":", 1)[0]
        return _Answer(("", ""), "", code if code in _CODE_NAME_SET else "UNKNOWN", [])
    return _open_inference_answer(response.infer_response)


def _bytes_rows(raw: bytes) -> list[str]:
    """The elements of a raw BYTES tensor: each a 4-byte little-endian length, then data."""
    rows, offset = [], 0
    while offset + 4 <= len(raw):
        length = int.from_bytes(raw[offset : offset + 4], "little")
        rows.append(raw[offset + 4 : offset + 4 + length].decode(errors="replace"))
        offset += 4 + length
    return rows


def _code_name(code: int) -> str:
    return _CODE_NAMES.get(code, grpc.StatusCode.UNKNOWN.name)


_VISIONRPC = _Messages(_visionrpc_asked, _visionrpc_answer)
_INFERENCE = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
_OPEN_INFERENCE = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# The calls that carry predictions, so the ``visionrpc_*`` request families count them.
PREDICTION_METHODS = {
    f"/{_INFERENCE}/Predict": _VISIONRPC,
    f"/{_INFERENCE}/PredictStream": _VISIONRPC,
    f"/{_OPEN_INFERENCE}/ModelInfer": _Messages(_open_inference_asked, _open_inference_answer),
    f"/{_OPEN_INFERENCE}/ModelStreamInfer": _Messages(
        _open_inference_asked, _open_inference_stream_answer
    ),
}


class _PredictLedger:
    """The prediction requests of one call, each counted once: answered, or left when the
    call ended (cancelled, expired, aborted), then under the call's status.

    A stream answers out of order, so an answer finds its request by model and the
    request's own id field (first come, first matched among equal keys). Only requests
    the server received count: a call refused or expired before its first request was
    read shows in ``grpc_server_handled_total`` alone.
    """

    def __init__(
        self, metrics: ServerMetrics, resolve_version: VersionResolver, messages: _Messages
    ) -> None:
        self._metrics = metrics
        self._resolve_version = resolve_version
        self._messages = messages
        self._pending: dict[tuple[str, str], deque[_Request]] = {}
        self._first_model: str | None = None
        self._last_version = ""
        self._requests = 0
        self._images = 0
        self._failed_images = 0

    def arrived(self, request: Any) -> None:
        if isinstance(request, bytes):
            # Refused before it was parsed (no token): nothing the caller sent is read.
            asked = _Asked(("", ""), "", "", 0)
        else:
            asked = self._messages.asked(request)
        if self._first_model is None:
            self._first_model = asked.model
        self._requests += 1
        self._images += asked.images
        self._pending.setdefault(asked.key, deque()).append(
            _Request(asked.model, asked.version, asked.images, time.perf_counter())
        )
        self._metrics.request_started(asked.model)

    def answered(self, response: Any) -> None:
        answer = self._messages.answer(response)
        if answer is None:
            return
        request = self._take(answer.key)
        if request is None:
            return
        if answer.error is not None:
            self._failed(request, answer.error)
            return
        self._last_version = answer.version
        self._metrics.request_finished(
            request.model,
            answer.version,
            "OK",
            request.images,
            time.perf_counter() - request.started,
        )
        for code in answer.image_codes:
            if code != "OK":
                self._failed_images += 1
            self._metrics.image_finished(request.model, answer.version, code)

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


class _Request(NamedTuple):
    model: str
    version: str
    images: int
    started: float
