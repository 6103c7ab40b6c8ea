"""The gRPC servicer: protobuf to plain Python and back, and the one error table.

Everything else (decoding, batching, running, postprocessing) lives in the
transport-free pipeline; metrics, access logs and request ids belong to
``interceptors.ObservabilityInterceptor``, which reads the messages this servicer takes
and returns. Domain errors map to status codes through ``STATUS_CODES``; anything
unexpected is logged and answered with INTERNAL. Refusals that mean "not now" carry
``grpc-retry-pushback-ms``, which gRPC clients obey as the time to wait before their
retry; nothing is sent before the outcome, so the call can still be retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.protos import task_to_proto

from .client_text import DETAILS_LIMIT, printable
from .errors import ErrorKind, VisionRPCError
from .pipeline import (
    EncodedImage,
    ImageInput,
    Pipeline,
    PredictCall,
    PredictOutcome,
    RawImage,
    held_at_arrival,
)
from .postprocess import ImageResult, PredictionOptions
from .preprocess import REPORTED_FORMATS, accepted_extensions
from .repository import LoadedModel, ModelRepository
from .tasks import serving_task

logger = logging.getLogger(__name__)

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
# gRPC's retry design: a client waits this many milliseconds before retrying the call.
PUSHBACK_KEY = "grpc-retry-pushback-ms"
RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status a caller sees for an error; unexpected ones are logged here, once.

    Messages quote what the caller sent (a model name, a label); escaped and cut, a
    message stays one readable line and fits the client's metadata limit.
    """
    if isinstance(error, VisionRPCError):
        return STATUS_CODES[error.kind], printable(error.message, DETAILS_LIMIT, raw=False)
    logger.error("unexpected error", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}"


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(
        self,
        pipeline: Pipeline,
        repository: ModelRepository,
        *,
        stream_max_in_flight: int,
    ) -> None:
        self._pipeline = pipeline
        self._repository = repository
        self._stream_max_in_flight = stream_max_in_flight

    async def Predict(self, request: pb.PredictRequest, context: Context) -> pb.PredictResponse:
        try:
            outcome = await self._pipeline.predict(
                call_from_proto(request), call_deadline(context), held_at_arrival()
            )
        except Exception as exc:
            code, message = status_of(exc)
            await abort_with_hint(context, code, message, exc)
        return response_to_proto(outcome, request.request_id)

    async def PredictStream(
        self, request_iterator: AsyncIterator[pb.PredictRequest], context: Context
    ) -> AsyncIterator[pb.PredictResponse]:
        """Answers requests concurrently, at most ``stream_max_in_flight`` at a time.

        A slot frees only once its answer is sent, so a client that stops reading
        stops the server from reading (and working on) more of its requests. (When the
        server drains, ``drain.DrainInterceptor`` ends ``request_iterator``.)
        """
        deadline = call_deadline(context)
        async for response in answer_in_completion_order(
            request_iterator,
            lambda request: self._stream_answer(request, deadline),
            self._stream_max_in_flight,
        ):
            yield response

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
            await abort_with_hint(context, code, message, exc)
        return model_info_to_proto(
            model, self._repository.versions(model.name), self._pipeline.limit_for(model)
        )

    async def _stream_answer(
        self, request: pb.PredictRequest, deadline: float | None
    ) -> pb.PredictResponse:
        try:
            outcome = await self._pipeline.predict(call_from_proto(request), deadline)
        except Exception as exc:
            code, message = status_of(exc)
            return pb.PredictResponse(
                model=request.model,
                version=request.version,
                request_id=request.request_id,
                error=pb.ErrorStatus(code=code.value[0], message=message),
            )
        return response_to_proto(outcome, request.request_id)


async def abort_with_hint(
    context: Context, code: grpc.StatusCode, message: str, error: Exception
) -> None:
    """End the call with ``code``; an error that means "not now" adds its retry hint to
    the trailing metadata already set (the request id)."""
    retry_after = getattr(error, "retry_after_seconds", None)
    if retry_after is None:
        await context.abort(code, message)
    hint = (PUSHBACK_KEY, str(max(1, round(retry_after * 1000))))
    await context.abort(code, message, (*(context.trailing_metadata() or ()), hint))


def call_deadline(context: Context) -> float | None:
    """The call's deadline on ``time.monotonic()``'s clock, or None if it has none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def answer_in_completion_order(
    requests: AsyncIterator[RequestT],
    answer: Callable[[RequestT], Awaitable[ResponseT]],
    max_in_flight: int,
) -> AsyncIterator[ResponseT]:
    """A stream's answers as they complete, at most ``max_in_flight`` requests at once.

    A slot frees only once its answer has been yielded (sent), so a client that stops
    reading stops the server from reading, and working on, more of its requests.
    ``answer`` must not raise: each protocol turns a request's failure into its answer.
    """
    answers: asyncio.Queue[ResponseT | None] = asyncio.Queue()
    slots = asyncio.Semaphore(max_in_flight)

    async def answer_one(request: RequestT) -> None:
        answers.put_nowait(await answer(request))

    async def read_requests() -> None:
        in_flight: set[asyncio.Task[None]] = set()
        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.create_task(answer_one(request))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            await asyncio.gather(*in_flight)
        finally:
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
        accepted_formats=list(REPORTED_FORMATS),
        accepted_extensions=list(accepted_extensions()),
        max_images_per_request=max_images_per_request,
    )
