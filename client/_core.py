"""What ``Client`` and ``AsyncClient`` share: everything that does no I/O.

Building requests from inputs and options, decoding responses into result
objects, merging metadata and timeouts, and the bookkeeping of ``predict_many``
(splitting into requests, matching streamed answers by request_id, input order).
The two clients only add the calls themselves, blocking or awaited.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import task_from_proto

from .channel import LoadBalancing, RetryPolicy, TLSConfig, channel_options
from .errors import (
    InvalidInputError,
    ModelNotFoundError,
    VisionRPCError,
    error_for_status,
    status_code_from_number,
    translate_rpc_error,
)
from .inputs import ImageInput, to_proto_image
from .results import (
    Classification,
    HealthStatus,
    ImageError,
    LabelScore,
    ModelInfo,
    ModelSummary,
    MultiLabel,
    Point,
    Points,
    Prediction,
)

DEFAULT_ADDRESS = "127.0.0.1:8001"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

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
    """The request's options; None leaves the model's configured default in force."""
    options = pb.PredictionOptions(all_scores=all_scores)
    if top_k is not None:
        options.top_k = top_k
    if threshold is not None:
        options.threshold = threshold
    if thresholds:
        options.class_thresholds.update(thresholds)
    if min_confidence is not None:
        options.min_confidence = min_confidence
    if tta is not None:
        options.tta = tta
    if tta_views is not None:
        options.tta_views = tta_views
    return options


def _label_scores(entries: Sequence[pb.LabelScore]) -> tuple[LabelScore, ...]:
    return tuple(
        LabelScore(label=entry.label, score=entry.score, threshold=entry.threshold)
        for entry in entries
    )


def decode_result(
    result: pb.ImageResult, model: str, version: str, index: int, raise_on_error: bool
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
    if kind == "classification":
        answer = result.classification
        return Classification(
            top=_label_scores(answer.top),
            below_min_confidence=answer.below_min_confidence,
            min_confidence=answer.min_confidence,
            **common,
        )
    if kind == "multilabel":
        return MultiLabel(
            labels=_label_scores(result.multilabel.labels),
            all_scores=_label_scores(result.multilabel.all_scores),
            **common,
        )
    if kind == "points":
        return Points(
            points=tuple(
                Point(
                    name=point.name,
                    x=point.x,
                    y=point.y,
                    x_normalized=point.x_normalized,
                    y_normalized=point.y_normalized,
                )
                for point in result.points.points
            ),
            **common,
        )
    if kind == "error":
        code = status_code_from_number(result.error.code)
    else:
        # A result with nothing set is a server defect; report it per image.
        code = grpc.StatusCode.UNKNOWN
    message = result.error.message if kind == "error" else "empty result from the server"
    if raise_on_error:
        raise error_for_status(code, message, index)
    return ImageError(code=code.name, message=message, index=index, **common)


def decode_response(
    response: pb.PredictResponse, first_index: int, raise_on_error: bool
) -> list[Prediction]:
    """Every image's result of one response, in order."""
    return [
        decode_result(result, response.model, response.version, first_index + i, raise_on_error)
        for i, result in enumerate(response.results)
    ]


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
        threshold=info.threshold,
        class_thresholds=dict(info.class_thresholds),
        min_confidence=info.min_confidence,
        tta_enabled=info.tta.enabled,
        tta_views=tuple(info.tta.views),
        tta_beta=info.tta.beta,
        provider=info.provider,
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
    """``predict_many``'s bookkeeping: requests of ``batch_size`` images, answers in input order.

    Images are encoded only when their request is produced, so a long collection
    of paths never sits in memory at once, only the requests in flight do.
    """

    def __init__(
        self,
        call: PredictCall,
        images: Sequence[ImageInput],
        batch_size: int,
        progress: ProgressCallback | None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.call = call
        self._images = images
        self._batch_size = batch_size
        self._progress = progress
        self._results: list[Prediction | None] = [None] * len(images)
        self._done = 0
        self._pending: dict[str, int] = {}

    @property
    def request_count(self) -> int:
        """How many requests the images are split into."""
        return -(-len(self._images) // self._batch_size)

    @property
    def finished(self) -> bool:
        """Whether every request has been answered."""
        return self._done == len(self._images)

    def request(self, first_index: int, request_id: str = "") -> pb.PredictRequest:
        """The request for the batch starting at ``first_index``; remembered until answered."""
        batch = self._images[first_index : first_index + self._batch_size]
        self._pending[request_id] = first_index
        return predict_request(self.call, batch, request_id)

    def requests(self) -> Iterator[pb.PredictRequest]:
        """Every request, each with a request_id that its streamed answer echoes."""
        for number, first_index in enumerate(range(0, len(self._images), self._batch_size)):
            yield self.request(first_index, str(number))

    def accept(self, response: pb.PredictResponse) -> None:
        """File one answer's results in place; a failed request raises its error."""
        first_index = self._pending.pop(response.request_id)
        if response.HasField("error") and response.error.code != 0:
            code = status_code_from_number(response.error.code)
            raise error_for_status(code, response.error.message)
        results = decode_response(response, first_index, self.call.raise_on_error)
        self._results[first_index : first_index + len(results)] = results
        self._done += len(results)
        if self._progress is not None:
            self._progress(self._done, len(self._images))

    def results(self) -> list[Prediction]:
        """All results in input order (once ``finished``)."""
        missing = [index for index, result in enumerate(self._results) if result is None]
        if missing:
            raise error_for_status(
                grpc.StatusCode.INTERNAL, f"the server left {len(missing)} images unanswered"
            )
        return [result for result in self._results if result is not None]


def predict_request(
    call: PredictCall, images: Sequence[ImageInput], request_id: str = ""
) -> pb.PredictRequest:
    """A ``PredictRequest`` for some images, refused if over the channel's message limit."""
    request = pb.PredictRequest(
        model=call.model,
        version=call.version,
        images=[to_proto_image(image) for image in images],
        options=call.options,
        request_id=request_id,
    )
    # gRPC would fail it with RESOURCE_EXHAUSTED, which reads as "overloaded" and is
    # retried, uploading the same oversized request again each time.
    size = request.ByteSize()
    if size > call.max_message_bytes:
        raise InvalidInputError(
            f"the request is {size} bytes, over max_message_bytes={call.max_message_bytes}: "
            "send fewer or smaller images per request",
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    return request


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
    return _HealthCheckRequest(service=service).SerializeToString()


def health_status_from_bytes(data: bytes) -> HealthStatus:
    """Decode a ``grpc.health.v1.HealthCheckResponse``."""
    response = _HealthCheckResponse.FromString(data)
    value: int = response.status  # type: ignore[attr-defined]
    try:
        return HealthStatus(value)
    except ValueError:
        return HealthStatus.UNKNOWN


def translate_health_error(error: grpc.RpcError, model: str | None) -> VisionRPCError:
    """A failed health check; the health service answers NOT_FOUND, bare, for unknown names."""
    translated = translate_rpc_error(error)
    if translated.code == grpc.StatusCode.NOT_FOUND:
        return ModelNotFoundError(f"the server reports no health for {model!r}", translated.code)
    return translated


class ClientBase:
    """Settings and call preparation common to ``Client`` and ``AsyncClient``."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float,
        retries: RetryPolicy | None,
        tls: TLSConfig | None,
        metadata: Metadata,
        max_message_bytes: int,
        keepalive_seconds: float | None,
        load_balancing: LoadBalancing,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.tls = tls
        self.metadata = tuple(metadata)
        self.max_message_bytes = max_message_bytes
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
        return self.timeout if timeout is None else timeout

    def _metadata(self, metadata: Metadata | None) -> tuple[tuple[str, str | bytes], ...]:
        return self.metadata + tuple(metadata or ())

    def _predict_call(
        self,
        model: str,
        *,
        version: str | None,
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
        return PredictCall(
            model=model,
            version=version or "",
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
            metadata=self._metadata(metadata),
            raise_on_error=raise_on_error,
            max_message_bytes=self.max_message_bytes,
        )


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
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
