"""What ``Client`` and ``AsyncClient`` share: everything that does no I/O.

Building requests from inputs and options, decoding responses into result
objects, merging metadata and timeouts, and the bookkeeping of ``predict_many``
(splitting into requests, matching streamed answers by request_id, input order).
The two clients only add the calls themselves, blocking or awaited.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message

from visionrpc.protos import MODEL_HINT_KEY, VERSION_HINT_KEY, task_from_proto
from visionrpc.protos import inference_pb2 as pb

from .channel import LoadBalancing, RetryPolicy, TLSConfig, channel_options
from .errors import (
    InvalidInputError,
    ModelNotFoundError,
    VisionRPCError,
    error_for_status,
    invalid_input,
    status_code_from_number,
    translate_rpc_error,
)
from .inputs import ImageInput, describe, to_proto_image
from .results import (
    TASK_RESULTS,
    HealthStatus,
    ImageError,
    ModelInfo,
    ModelSummary,
    Prediction,
)

DEFAULT_ADDRESS = "127.0.0.1:8001"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Read by Client() and AsyncClient() when no address is given, as the CLI does.
SERVER_ENV = "VISIONRPC_SERVER"
TOKEN_ENV = "VISIONRPC_TOKEN"
REQUEST_ID_KEY = "x-request-id"
# gRPC servers refuse headers over 8 KiB by default (grpc.max_metadata_size), with
# RESOURCE_EXHAUSTED, which reads as overload and is retried; HPACK counts 32 bytes
# of overhead per entry.
MAX_METADATA_BYTES = 8 * 1024
_METADATA_ENTRY_OVERHEAD = 32
# Every uint32 option of the proto.
_UINT32_LIMIT = 2**32

Metadata: TypeAlias = Sequence[tuple[str, str | bytes]]
"""gRPC metadata: ``(key, value)`` pairs with lower-case keys, e.g. an authorization header."""
ProgressCallback: TypeAlias = Callable[[int, int], None]
"""Called as ``progress(images_done, images_total)`` after each answered request."""

HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"


@dataclasses.dataclass(frozen=True)
class PredictCall:
    """One predict or predict_many call, resolved against the client's defaults."""

    model: str
    version: str
    options: pb.PredictionOptions
    timeout: float
    metadata: tuple[tuple[str, str | bytes], ...]
    raise_on_error: bool
    max_message_bytes: int
    # The x-request-id sent with the call (the server logs it and echoes it).
    request_id: str = ""


def model_hint(model: str, version: str) -> tuple[tuple[str, str], ...]:
    """Metadata naming the call's model, so the server can give it a queue slot before it
    has read the message; none where the name is no valid header value."""
    if not (model.isascii() and model.isprintable()):
        return ()
    return ((MODEL_HINT_KEY, model), *(((VERSION_HINT_KEY, version),) if version else ()))


def _whole_number(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_input(f"{name} must be a whole number, got {type(value).__name__}")
    if not 1 <= value < _UINT32_LIMIT:
        raise invalid_input(f"{name} must be between 1 and {_UINT32_LIMIT - 1}, got {value}")
    return value


def _probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_input(f"{name} must be a number in [0, 1], got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise invalid_input(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise invalid_input(f"{name} must be True or False, got {type(value).__name__}")
    return value


def prediction_options(
    *,
    top_k: int | None,
    threshold: float | None,
    thresholds: Mapping[str, float] | None,
    min_confidence: float | None,
    tta: bool | None,
    tta_views: int | None,
    all_scores: bool,
) -> pb.PredictionOptions:
    """The request's options; None leaves the model's configured default in force.

    Raises:
        InvalidInputError: an option of the wrong type or out of range, named.
    """
    options = pb.PredictionOptions(all_scores=_flag("all_scores", all_scores))
    if top_k is not None:
        options.top_k = _whole_number("top_k", top_k)
    if threshold is not None:
        options.threshold = _probability("threshold", threshold)
    if thresholds:
        if not isinstance(thresholds, Mapping):
            raise invalid_input(
                f"thresholds must map labels to numbers, got {type(thresholds).__name__}"
            )
        for label, value in thresholds.items():
            if not isinstance(label, str):
                raise invalid_input(f"thresholds: labels must be str, got {type(label).__name__}")
            options.class_thresholds[label] = _probability(f"thresholds[{label!r}]", value)
    if min_confidence is not None:
        options.min_confidence = _probability("min_confidence", min_confidence)
    if tta is not None:
        options.tta = _flag("tta", tta)
    if tta_views is not None:
        options.tta_views = _whole_number("tta_views", tta_views)
    return options


def model_version(version: str | int | None) -> str:
    """A version argument as the API carries it: "" for the newest, else its digits."""
    if version is None:
        return ""
    if isinstance(version, int) and not isinstance(version, bool) and version >= 1:
        return str(version)
    if isinstance(version, str) and (version == "" or version.isdigit()):
        return version
    raise invalid_input(
        f"version must be a version number such as 3 or '3' (None: the newest), got {version!r}"
    )


def checked_metadata(metadata: Metadata) -> tuple[tuple[str, str | bytes], ...]:
    """Metadata as a tuple of pairs, refused before sending if servers would refuse it."""
    pairs = tuple(metadata)
    size = 0
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
            raise invalid_input("metadata must be (key, value) pairs with str keys")
        key, value = pair
        if not isinstance(value, str | bytes):
            raise invalid_input(f"metadata {key!r}: the value must be str or bytes")
        size += len(key) + len(value) + _METADATA_ENTRY_OVERHEAD
    if size > MAX_METADATA_BYTES:
        raise invalid_input(
            f"the call's metadata is {size} bytes, over the {MAX_METADATA_BYTES} bytes "
            "gRPC servers accept by default: send smaller headers"
        )
    return pairs


def image_message(index: int, name: str, message: str) -> str:
    """A per-image message: its position in the caller's input, and its file when known."""
    where = f"image {index} ({name})" if name else f"image {index}"
    return f"{where}: {message}"


def _without_position(message: str, position_in_request: int) -> str:
    # The server names the image by its position in its request, which is not the
    # caller's position once a list is split into several requests.
    prefix = f"image {position_in_request}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def decode_result(
    result: pb.ImageResult,
    model: str,
    version: str,
    index: int,
    *,
    position_in_request: int | None = None,
    name: str = "",
    request_id: str = "",
) -> Prediction:
    """One image's answer as a typed result; ``index`` is its position in the caller's input."""
    common: dict[str, Any] = {
        "model": model,
        "version": version,
        "tta_applied": result.tta_applied,
        "tta_views": result.tta_views,
        "original_width": result.original_width,
        "original_height": result.original_height,
    }
    kind = result.WhichOneof("result")
    if kind in TASK_RESULTS:
        return TASK_RESULTS[kind].from_proto(getattr(result, kind), common)
    if kind == "error":
        code = status_code_from_number(result.error.code)
        message = _without_position(
            result.error.message, index if position_in_request is None else position_in_request
        )
    else:
        # A result with nothing set is a server defect; report it per image.
        code = grpc.StatusCode.UNKNOWN
        message = "empty result from the server"
    return ImageError(
        code=code.name,
        message=image_message(index, name, message),
        index=index,
        request_id=request_id,
        **common,
    )


def raise_first_error(results: Sequence[Prediction]) -> None:
    """``raise_on_error``: the first failed input's error, naming it, as an exception."""
    for result in results:
        if isinstance(result, ImageError):
            code = getattr(grpc.StatusCode, result.code, grpc.StatusCode.UNKNOWN)
            raise error_for_status(code, result.message, result.index, result.request_id)


def decode_models(response: pb.ListModelsResponse) -> list[ModelSummary]:
    """The ``models()`` answer, sorted by name."""
    summaries = [
        ModelSummary(
            name=model.name,
            task=task_from_proto(model.task),
            versions=tuple(model.versions),
            provider=model.provider,
        )
        for model in response.models
    ]
    return sorted(summaries, key=lambda summary: summary.name)


def decode_model_info(info: pb.ModelInfo) -> ModelInfo:
    """The ``model_info()`` answer."""
    return ModelInfo(
        name=info.name,
        version=info.version,
        versions=tuple(info.versions),
        task=task_from_proto(info.task),
        labels=tuple(info.labels),
        input_height=info.input.height,
        input_width=info.input.width,
        resize_method=info.input.resize_method,
        top_k=info.top_k,
        threshold=info.threshold,
        class_thresholds=dict(info.class_thresholds),
        min_confidence=info.min_confidence,
        tta_enabled=info.tta.enabled,
        tta_views=tuple(info.tta.views),
        tta_beta=info.tta.beta,
        tta_zoom=info.tta.zoom,
        provider=info.provider,
        accepted_formats=tuple(info.accepted_formats),
        accepted_extensions=tuple(info.accepted_extensions),
        max_images_per_request=info.max_images_per_request,
        max_batch_size=info.batching.max_batch_size,
        max_queue_delay_ms=info.batching.max_queue_delay_ms,
        max_queue_size=info.batching.max_queue_size,
        instances=info.batching.instances,
        metrics=dict(info.metrics),
        dataset=info.dataset,
        trained_at=info.trained_at,
        config=json.loads(info.config_json) if info.config_json else {},
    )


class BatchPlan:
    """The bookkeeping of one predict call: requests, answers filed in input order.

    The images are split into groups of ``batch_size``; each group becomes one
    request, or several where the encoded images would exceed the message limit.
    Images are encoded only when their request is produced, so a long collection of
    paths never sits in memory at once, only the requests in flight do. An input
    that cannot be sent gets its own ``ImageError`` here and is left out of its
    request. After a broken stream, ``requests()`` again yields what is unanswered.
    Thread-safe where the clients need it: requests may be produced on a gRPC thread
    while answers are filed on the caller's.
    """

    def __init__(
        self,
        call: PredictCall,
        images: Sequence[ImageInput],
        batch_size: int,
        progress: ProgressCallback | None,
    ) -> None:
        _whole_number("batch_size", batch_size)
        self.call = call
        self._images = images
        self._batch_size = batch_size
        self._progress = progress
        self._results: list[Prediction | None] = [None] * len(images)
        self._lock = threading.Lock()
        self._done = 0
        self._answered_by_server = 0
        self._requests_made = 0
        # request_id -> the caller's positions of the request's images
        self._pending: dict[str, list[int]] = {}

    @property
    def request_count(self) -> int:
        """How many requests the images are split into (at least; more if over the size limit)."""
        return -(-len(self._images) // self._batch_size)

    @property
    def finished(self) -> bool:
        """Whether every input has its result."""
        return self._done == len(self._images)

    @property
    def answered_by_server(self) -> int:
        """How many images the server has answered so far."""
        return self._answered_by_server

    def requests(self) -> Iterator[pb.PredictRequest]:
        """Requests for every input still without a result, each with its own request_id."""
        with self._lock:
            # Requests that were in flight when a stream broke will not be answered.
            self._pending.clear()
        for first in range(0, len(self._images), self._batch_size):
            group = range(first, min(first + self._batch_size, len(self._images)))
            yield from self._requests_for([i for i in group if self._results[i] is None])

    def _requests_for(self, positions: list[int]) -> Iterator[pb.PredictRequest]:
        limit = self.call.max_message_bytes
        overhead = _request(self.call, [], "0").ByteSize() + 16
        batch: list[tuple[int, pb.Image]] = []
        size = overhead
        for position in positions:
            try:
                image = to_proto_image(self._images[position])
            except InvalidInputError as error:
                self._fail(position, error.code, error.message)
                continue
            # A repeated field adds a tag and a length prefix to each image.
            image_size = image.ByteSize() + 11
            if overhead + image_size > limit:
                self._fail(
                    position,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the image is {image_size} bytes encoded, over max_message_bytes={limit}: "
                    "send a smaller image or raise max_message_bytes (the server's limit too)",
                )
                continue
            if batch and size + image_size > limit:
                yield self._request(batch)
                batch, size = [], overhead
            batch.append((position, image))
            size += image_size
        if batch:
            yield self._request(batch)

    def _request(self, batch: list[tuple[int, pb.Image]]) -> pb.PredictRequest:
        with self._lock:
            request_id = str(self._requests_made)
            self._requests_made += 1
            self._pending[request_id] = [position for position, _ in batch]
        return _request(self.call, [image for _, image in batch], request_id)

    def _fail(self, position: int, code: grpc.StatusCode, message: str) -> None:
        name = describe(self._images[position])
        with self._lock:
            # A generator of a broken stream may still be finishing a request when the
            # next stream's generator starts: an input is filed, and counted, once.
            if self._results[position] is not None:
                return
            self._results[position] = ImageError(
                code=code.name,
                message=image_message(position, name, message),
                index=position,
                request_id=self.call.request_id,
                model=self.call.model,
                version=self.call.version,
                tta_applied=False,
                tta_views=0,
                original_width=0,
                original_height=0,
            )
            self._done += 1

    def accept(self, response: pb.PredictResponse, request_id: str | None = None) -> None:
        """File one answer's results in place; a failed request raises its error.

        ``request_id`` is the request's, for unary answers; streamed answers carry it.
        """
        with self._lock:
            positions = self._pending.pop(response.request_id if request_id is None else request_id)
        if response.HasField("error") and response.error.code != 0:
            code = status_code_from_number(response.error.code)
            raise error_for_status(code, response.error.message, request_id=self.call.request_id)
        results = [
            decode_result(
                result,
                response.model,
                response.version,
                position,
                position_in_request=local,
                name=describe(self._images[position]),
                request_id=self.call.request_id,
            )
            for local, (position, result) in enumerate(
                zip(positions, response.results, strict=False)
            )
        ]
        with self._lock:
            for position, result in zip(positions, results, strict=False):
                if self._results[position] is None:
                    self._done += 1
                    self._answered_by_server += 1
                self._results[position] = result
            done = self._done
        if self._progress is not None:
            self._progress(done, len(self._images))

    def fail_unanswered(self, error: VisionRPCError) -> None:
        """Give every input still without a result ``error`` (a stream broke for good)."""
        for position, result in enumerate(self._results):
            if result is None:
                self._fail(position, error.code, error.message)

    def results(self) -> list[Prediction]:
        """All results in input order (once ``finished``); raises under ``raise_on_error``."""
        missing = [index for index, result in enumerate(self._results) if result is None]
        if missing:
            raise error_for_status(
                grpc.StatusCode.INTERNAL,
                f"the server left {len(missing)} images unanswered",
                request_id=self.call.request_id,
            )
        results = [result for result in self._results if result is not None]
        if self.call.raise_on_error:
            raise_first_error(results)
        return results


def _request(call: PredictCall, images: list[pb.Image], request_id: str) -> pb.PredictRequest:
    return pb.PredictRequest(
        model=call.model,
        version=call.version,
        images=images,
        options=call.options,
        request_id=request_id,
    )


def _health_message_classes() -> tuple[type[Message], type[Message]]:
    # grpc.health.v1 is two one-field messages; declaring them here keeps the client
    # free of the grpcio-health-checking package. A private pool avoids clashing
    # with that package's registration when both are loaded in one process.
    file = descriptor_pb2.FileDescriptorProto(
        name="visionrpc/client/health.proto", package="grpc.health.v1", syntax="proto3"
    )
    field = descriptor_pb2.FieldDescriptorProto
    request = file.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    response = file.message_type.add(name="HealthCheckResponse")
    # The status enum travels as a varint, exactly like an int32.
    response.field.add(name="status", number=1, type=field.TYPE_INT32, label=field.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{file.package}.{name}"))
        for name in ("HealthCheckRequest", "HealthCheckResponse")
    )  # type: ignore[return-value]


_HealthCheckRequest, _HealthCheckResponse = _health_message_classes()


def health_request_bytes(service: str) -> bytes:
    """The serialised ``grpc.health.v1.HealthCheckRequest`` for a service (a model name)."""
    # ParseDict rather than a keyword argument: Message's stubs declare no fields.
    return json_format.ParseDict({"service": service}, _HealthCheckRequest()).SerializeToString()


def health_status_from_bytes(data: bytes) -> HealthStatus:
    """Decode a ``grpc.health.v1.HealthCheckResponse``."""
    response = _HealthCheckResponse.FromString(data)
    value: int = response.status  # type: ignore[attr-defined]
    try:
        return HealthStatus(value)
    except ValueError:
        return HealthStatus.UNKNOWN


def translate_health_error(translated: VisionRPCError, model: str | None) -> VisionRPCError:
    """A failed health check; the health service answers NOT_FOUND, bare, for unknown names."""
    if translated.code == grpc.StatusCode.NOT_FOUND:
        return ModelNotFoundError(
            f"the server reports no health for {model!r}",
            translated.code,
            request_id=translated.request_id,
        )
    return translated


def resolve_address(address: str | None, token: str | None) -> tuple[str, str | None]:
    """The address and token to use: given ones, else ``$VISIONRPC_SERVER``/``$VISIONRPC_TOKEN``.

    The token is read from the environment only with the address, so that a token
    meant for the configured server is never sent to one named in code.
    """
    if address is not None:
        return address, token
    from_environment = os.environ.get(SERVER_ENV) or DEFAULT_ADDRESS
    return from_environment, token if token is not None else os.environ.get(TOKEN_ENV) or None


class ClientBase:
    """Settings and call preparation common to ``Client`` and ``AsyncClient``."""

    def __init__(
        self,
        address: str | None,
        *,
        token: str | None,
        timeout: float,
        retries: RetryPolicy | None,
        tls: TLSConfig | None,
        metadata: Metadata,
        max_message_bytes: int,
        keepalive_seconds: float | None,
        load_balancing: LoadBalancing,
    ) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise invalid_input(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.address, token = resolve_address(address, token)
        self.timeout = float(timeout)
        self.retries = retries
        self.tls = tls
        authorization = (("authorization", f"Bearer {token}"),) if token else ()
        self.metadata = checked_metadata((*authorization, *metadata))
        self.max_message_bytes = max_message_bytes
        # model, version -> the most images one request may carry (0: no limit)
        self._images_per_request: dict[tuple[str, str], int] = {}
        self._channel_options = channel_options(
            retries=retries,
            tls=tls,
            max_message_bytes=max_message_bytes,
            keepalive_seconds=keepalive_seconds,
            load_balancing=load_balancing,
        )

    def __repr__(self) -> str:
        security = "tls" if self.tls is not None else "insecure"
        return f"{type(self).__name__}({self.address!r}, {security})"

    def _timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return self.timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise invalid_input(f"timeout must be a positive number of seconds, got {timeout!r}")
        return float(timeout)

    def _call_metadata(
        self, metadata: Metadata | None
    ) -> tuple[tuple[tuple[str, str | bytes], ...], str]:
        """The call's metadata with its x-request-id (the caller's own, or a new one)."""
        pairs = checked_metadata((*self.metadata, *(metadata or ())))
        given = [value for key, value in pairs if key == REQUEST_ID_KEY]
        if given:
            value = given[0]
            return pairs, value.decode(errors="replace") if isinstance(value, bytes) else value
        request_id = uuid.uuid4().hex
        return (*pairs, (REQUEST_ID_KEY, request_id)), request_id

    def _translate(self, error: grpc.RpcError, request_id: str = "") -> VisionRPCError:
        return translate_rpc_error(error, request_id, tls=self.tls is not None)

    def _predict_call(
        self,
        model: str,
        *,
        version: str | int | None,
        top_k: int | None,
        threshold: float | None,
        thresholds: Mapping[str, float] | None,
        min_confidence: float | None,
        tta: bool | None,
        tta_views: int | None,
        all_scores: bool,
        timeout: float | None,
        metadata: Metadata | None,
        raise_on_error: bool,
    ) -> PredictCall:
        if not isinstance(model, str) or not model:
            raise invalid_input(f"model must be a model name (str), got {model!r}")
        call_metadata, request_id = self._call_metadata(metadata)
        version_text = model_version(version)
        with contextlib.suppress(InvalidInputError):  # the hint alone would be too much
            call_metadata = checked_metadata((*call_metadata, *model_hint(model, version_text)))
        return PredictCall(
            model=model,
            version=version_text,
            options=prediction_options(
                top_k=top_k,
                threshold=threshold,
                thresholds=thresholds,
                min_confidence=min_confidence,
                tta=tta,
                tta_views=tta_views,
                all_scores=all_scores,
            ),
            timeout=self._timeout(timeout),
            metadata=call_metadata,
            raise_on_error=_flag("raise_on_error", raise_on_error),
            max_message_bytes=self.max_message_bytes,
            request_id=request_id,
        )

    def _batch_size(self, call: PredictCall, batch_size: int) -> int:
        """``batch_size`` capped at the server's limit for the model, once that is known."""
        limit = self._images_per_request.get((call.model, call.version), 0)
        return min(batch_size, limit) if limit else batch_size

    def _learn_limit(self, call: PredictCall, info: pb.ModelInfo | None) -> None:
        """Remember the model's most images per request (None: the server cannot say)."""
        limit = 0 if info is None else info.max_images_per_request
        self._images_per_request[(call.model, call.version)] = limit

    def _knows_limit(self, call: PredictCall) -> bool:
        return (call.model, call.version) in self._images_per_request


def as_batch(
    images: ImageInput | list[Any] | tuple[Any, ...],
) -> tuple[list[ImageInput], bool]:
    """``predict``'s images as a list, and whether the caller gave a list (or tuple) of them."""
    if isinstance(images, list | tuple):
        return list(images), True
    return [images], False


def stream_timeout(call: PredictCall, request_count: int, max_in_flight: int) -> float:
    """The deadline of a whole ``predict_many`` stream.

    ``timeout`` bounds each request; requests go in waves of ``max_in_flight``,
    so the stream gets one ``timeout`` per wave.
    """
    waves = max(1, -(-request_count // max_in_flight))
    return call.timeout * waves


def check_max_in_flight(max_in_flight: int) -> None:
    """Refuse a window that would never let a request through."""
    _whole_number("max_in_flight", max_in_flight)


def resume_delays(retries: RetryPolicy | None) -> list[float]:
    """Seconds to wait before each new stream that resumes a broken ``predict_many``.

    Without retries, none: a broken stream's unanswered inputs get UNAVAILABLE errors.
    With them, one resume per retry attempt, backing off as the policy says.
    """
    if retries is None:
        return []
    return [
        min(retries.initial_backoff * retries.backoff_multiplier**attempt, retries.max_backoff)
        for attempt in range(retries.max_attempts - 1)
    ]


def should_resume(failure: VisionRPCError, plan: BatchPlan, delays: list[float]) -> bool:
    """Whether a broken stream is worth another: the server went away and retries remain."""
    return failure.code == grpc.StatusCode.UNAVAILABLE and bool(delays) and not plan.finished


def give_up(failure: VisionRPCError, plan: BatchPlan) -> None:
    """A stream broke for good: partial results stand, or the whole call fails.

    With nothing answered at all, the failure is the call's (server down, wrong
    token), and raises; otherwise every unanswered input gets it as its ImageError.
    """
    if plan.answered_by_server == 0:
        raise failure
    plan.fail_unanswered(failure)
