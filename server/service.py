"""The gRPC servicer: protobuf to plain Python and back, and the one error table.

Everything else (decoding, batching, running, postprocessing) lives in the
transport-free pipeline. Domain errors map to status codes through ``STATUS_CODES``;
anything unexpected is logged and answered with INTERNAL.

Each Predict call, and each request of a PredictStream, ends in ``ServerMetrics`` and
one access-log line carrying the call's request id: the caller's ``x-request-id``
metadata, or a new one, echoed in the trailing metadata. Nothing is sent before a
call's outcome is known: initial metadata would commit the call, and gRPC never retries
a committed call. Refusals that mean "not now" carry ``grpc-retry-pushback-ms``, which
gRPC clients obey as the time to wait before their retry.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.protos import task_to_proto

from .drain import SHUTTING_DOWN, Drain
from .errors import ErrorKind, VisionRPCError
from .logging_setup import ACCESS_LOGGER, request_log
from .metrics import ServerMetrics
from .pipeline import EncodedImage, ImageInput, Pipeline, PredictCall, PredictOutcome, RawImage
from .postprocess import ImageResult, PredictionOptions
from .preprocess import REPORTED_FORMATS, accepted_extensions
from .repository import LoadedModel, ModelRepository
from .tasks import serving_task

logger = logging.getLogger(__name__)
access_logger = logging.getLogger(ACCESS_LOGGER)

REQUEST_ID_KEY = "x-request-id"
# gRPC's retry design: a client waits this many milliseconds before retrying the call.
PUSHBACK_KEY = "grpc-retry-pushback-ms"

STATUS_CODES: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}

Context = grpc.aio.ServicerContext[Any, Any]


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status a caller sees for an error; unexpected ones are logged here, once."""
    if isinstance(error, VisionRPCError):
        return STATUS_CODES[error.kind], error.message
    logger.error("unexpected error", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}"


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(
        self,
        pipeline: Pipeline,
        repository: ModelRepository,
        *,
        stream_max_in_flight: int,
        metrics: ServerMetrics | None = None,
        drain: Drain | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._repository = repository
        self._stream_max_in_flight = stream_max_in_flight
        self._drain = Drain() if drain is None else drain
        self._metrics = ServerMetrics(CollectorRegistry()) if metrics is None else metrics

    async def Predict(self, request: pb.PredictRequest, context: Context) -> pb.PredictResponse:
        request_id = _echo_request_id(context)
        started = time.perf_counter()
        with self._metrics.in_flight(request.model):
            try:
                outcome = await self._pipeline.predict(call_from_proto(request), _deadline(context))
            except asyncio.CancelledError:
                self._finished(request, _cancellation_code(context), started, request_id)
                raise
            except Exception as exc:
                code, message = status_of(exc)
                self._finished(request, code, started, request_id)
                await _abort(context, code, message, exc, request_id)
        self._finished(request, grpc.StatusCode.OK, started, request_id, outcome)
        return response_to_proto(outcome, request.request_id)

    async def PredictStream(
        self, request_iterator: AsyncIterator[pb.PredictRequest], context: Context
    ) -> AsyncIterator[pb.PredictResponse]:
        """Answers requests concurrently, at most ``stream_max_in_flight`` at a time.

        A slot frees only once its answer is sent, so a client that stops reading
        stops the server from reading (and working on) more of its requests. Once the
        server drains, the stream reads no more requests, answers the ones it has and
        ends with UNAVAILABLE, so an idle stream does not hold the shutdown.
        """
        request_id = _echo_request_id(context)
        deadline = _deadline(context)
        answers: asyncio.Queue[pb.PredictResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self._stream_max_in_flight)
        cut_by_drain = False

        async def answer(request: pb.PredictRequest) -> None:
            answers.put_nowait(await self._stream_answer(request, deadline, request_id))

        async def read_requests() -> None:
            nonlocal cut_by_drain
            in_flight: set[asyncio.Task[None]] = set()
            drained = asyncio.ensure_future(self._drain.started())
            try:
                while True:
                    reading = asyncio.ensure_future(anext(request_iterator, None))
                    await asyncio.wait((reading, drained), return_when=asyncio.FIRST_COMPLETED)
                    if not reading.done():
                        reading.cancel()
                        cut_by_drain = True
                        break
                    if (request := reading.result()) is None:
                        break
                    await slots.acquire()
                    task = asyncio.create_task(answer(request))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                await asyncio.gather(*in_flight)
            finally:
                drained.cancel()
                for task in in_flight:
                    task.cancel()
                answers.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (response := await answers.get()) is not None:
                yield response
                slots.release()
            await reader
        finally:
            reader.cancel()
        if cut_by_drain:
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        summaries = []
        for name in self._repository.names():
            newest = self._repository.get(name)
            summaries.append(
                pb.ModelSummary(
                    name=name,
                    task=task_to_proto(newest.config.task),
                    versions=[str(v) for v in self._repository.versions(name)],
                    provider=newest.runtime.provider,
                )
            )
        return pb.ListModelsResponse(models=summaries)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Context) -> pb.ModelInfo:
        try:
            model = self._repository.get(request.model, request.version)
        except VisionRPCError as exc:
            code, message = status_of(exc)
            await _abort(context, code, message, exc)
        return model_info_to_proto(
            model, self._repository.versions(model.name), self._pipeline.limit_for(model)
        )

    async def _stream_answer(
        self, request: pb.PredictRequest, deadline: float | None, request_id: str
    ) -> pb.PredictResponse:
        started = time.perf_counter()
        with self._metrics.in_flight(request.model):
            try:
                outcome = await self._pipeline.predict(call_from_proto(request), deadline)
            except Exception as exc:
                code, message = status_of(exc)
                self._finished(request, code, started, request_id)
                return pb.PredictResponse(
                    model=request.model,
                    version=request.version,
                    request_id=request.request_id,
                    error=pb.ErrorStatus(code=code.value[0], message=message),
                )
        self._finished(request, grpc.StatusCode.OK, started, request_id, outcome)
        return response_to_proto(outcome, request.request_id)

    def _finished(
        self,
        request: pb.PredictRequest,
        code: grpc.StatusCode,
        started: float,
        request_id: str,
        outcome: PredictOutcome | None = None,
    ) -> None:
        """Metrics and the access-log line of one answered request."""
        seconds = time.perf_counter() - started
        version = self._version_of(request) if outcome is None else str(outcome.model.version)
        images = len(request.images)
        self._metrics.request_finished(request.model, version, code.name, images, seconds)
        if outcome is not None:
            for result in outcome.results:
                image_code = "OK"
                if isinstance(result, VisionRPCError):
                    image_code = STATUS_CODES[result.kind].name
                self._metrics.image_finished(request.model, version, image_code)
        request_log(
            access_logger,
            model=request.model,
            version=version,
            images=images,
            status=code.name,
            latency_seconds=seconds,
            request_id=request_id,
        )

    def _version_of(self, request: pb.PredictRequest) -> str:
        """The version a failed request was for: resolved when the model is known."""
        try:
            return str(self._repository.get(request.model, request.version).version)
        except VisionRPCError:
            return request.version


def _echo_request_id(context: Context) -> str:
    """The caller's ``x-request-id``, or a new one; echoed so both sides log the same id.

    Trailing metadata only: sending initial metadata now would commit the call, and
    gRPC would never retry it.
    """
    sent = [value for key, value in context.invocation_metadata() or () if key == REQUEST_ID_KEY]
    request_id = str(sent[0]) if sent else uuid.uuid4().hex
    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
    return request_id


async def _abort(
    context: Context,
    code: grpc.StatusCode,
    message: str,
    error: Exception,
    request_id: str | None = None,
) -> None:
    """End the call with ``code``, the request id and, for "not now", the retry hint."""
    metadata: list[tuple[str, str]] = []
    if request_id is not None:
        metadata.append((REQUEST_ID_KEY, request_id))
    retry_after = getattr(error, "retry_after_seconds", None)
    if retry_after is not None:
        metadata.append((PUSHBACK_KEY, str(max(1, round(retry_after * 1000)))))
    await context.abort(code, message, trailing_metadata=tuple(metadata))


def _cancellation_code(context: Context) -> grpc.StatusCode:
    """A handler cancelled by grpc: its deadline passed, or the caller went away."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _deadline(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def call_from_proto(request: pb.PredictRequest) -> PredictCall:
    return PredictCall(
        model=request.model,
        version=request.version or None,
        images=[image_from_proto(image) for image in request.images],
        options=options_from_proto(request.options),
    )


def image_from_proto(image: pb.Image) -> ImageInput:
    if image.HasField("raw"):
        raw = image.raw
        return RawImage(
            pixels=raw.pixels, height=raw.height, width=raw.width, channels=raw.channels
        )
    # An image with neither field set arrives as empty bytes and fails as "empty".
    return EncodedImage(data=image.encoded)


def options_from_proto(options: pb.PredictionOptions) -> PredictionOptions:
    return PredictionOptions(
        top_k=options.top_k if options.HasField("top_k") else None,
        threshold=options.threshold if options.HasField("threshold") else None,
        class_thresholds=dict(options.class_thresholds),
        min_confidence=options.min_confidence if options.HasField("min_confidence") else None,
        tta=options.tta if options.HasField("tta") else None,
        tta_views=options.tta_views if options.HasField("tta_views") else None,
        all_scores=options.all_scores,
    )


def response_to_proto(outcome: PredictOutcome, request_id: str) -> pb.PredictResponse:
    return pb.PredictResponse(
        model=outcome.model.name,
        version=str(outcome.model.version),
        task=task_to_proto(outcome.model.config.task),
        results=[
            image_result_to_proto(result, outcome.model.config.task) for result in outcome.results
        ],
        request_id=request_id,
    )


def image_result_to_proto(outcome: ImageResult | VisionRPCError, task: str) -> pb.ImageResult:
    if isinstance(outcome, VisionRPCError):
        code, message = status_of(outcome)
        return pb.ImageResult(error=pb.ErrorStatus(code=code.value[0], message=message))
    converted = pb.ImageResult(
        tta_applied=outcome.tta_applied,
        tta_views=outcome.tta_views,
        original_width=outcome.original_width,
        original_height=outcome.original_height,
    )
    # The model's task module fills its own field of the result.
    serving_task(task).to_v1(outcome.result, converted)
    return converted


def model_info_to_proto(
    model: LoadedModel, versions: list[int], max_images_per_request: int
) -> pb.ModelInfo:
    config = model.config
    return pb.ModelInfo(
        name=config.name,
        version=str(model.version),
        versions=[str(v) for v in versions],
        task=task_to_proto(config.task),
        labels=list(config.labels),
        input=pb.InputGeometry(
            height=config.input.height,
            width=config.input.width,
            resize_method=config.input.resize_method,
        ),
        threshold=config.threshold,
        class_thresholds=dict(config.class_thresholds),
        min_confidence=config.min_confidence,
        top_k=config.top_k,
        tta=pb.TTASettings(
            enabled=config.tta.enabled,
            views=list(config.tta.views),
            beta=config.tta.beta,
            zoom=config.tta.zoom,
        ),
        provider=model.runtime.provider,
        batching=pb.BatchingSettings(
            max_batch_size=model.batching.max_batch_size,
            max_queue_delay_ms=model.batching.max_queue_delay_ms,
            max_queue_size=model.batching.max_queue_size,
            instances=model.batching.instances,
        ),
        metrics=dict(config.training.metrics),
        dataset=config.training.dataset,
        trained_at=config.training.trained_at,
        config_json=config.to_json(),
        max_images_per_request=max_images_per_request,
        accepted_formats=list(REPORTED_FORMATS),
        accepted_extensions=list(accepted_extensions()),
    )
