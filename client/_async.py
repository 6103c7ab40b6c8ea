"""``AsyncClient``: the asyncio visionrpc client, the twin of ``Client``."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, overload

import grpc

from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc

from ._core import (
    DEFAULT_MAX_MESSAGE_BYTES,
    HEALTH_CHECK_METHOD,
    BatchPlan,
    ClientBase,
    Metadata,
    PredictCall,
    ProgressCallback,
    as_batch,
    check_max_in_flight,
    decode_model_info,
    decode_models,
    give_up,
    health_request_bytes,
    health_status_from_bytes,
    model_version,
    resume_delays,
    should_resume,
    stream_timeout,
    translate_health_error,
)
from .channel import LoadBalancing, RetryPolicy, TLSConfig
from .errors import VisionRPCError
from .inputs import ImageInput
from .results import HealthStatus, ModelInfo, ModelSummary, Prediction


class AsyncClient(ClientBase):
    """An asyncio client for a visionrpc server, over one long-lived ``grpc.aio`` channel.

    Create it inside the event loop that uses it; use it as an async context
    manager (or await ``aclose()``)::

        async with AsyncClient("127.0.0.1:8001") as client:
            result = await client.predict("pets", "cat.jpg", top_k=3)
            print(result.label, result.score)

    Every method has the same arguments as ``Client``'s, and is awaited.

    Args: as for ``Client``.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retries: RetryPolicy | None = RetryPolicy(),  # noqa: B008 (frozen, so sharing is safe)
        tls: TLSConfig | None = None,
        metadata: Metadata = (),
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        keepalive_seconds: float | None = None,
        load_balancing: LoadBalancing = "pick_first",
    ) -> None:
        super().__init__(
            address,
            token=token,
            timeout=timeout,
            retries=retries,
            tls=tls,
            metadata=metadata,
            max_message_bytes=max_message_bytes,
            keepalive_seconds=keepalive_seconds,
            load_balancing=load_balancing,
        )
        if tls is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=self._channel_options)
        else:
            self._channel = grpc.aio.secure_channel(
                self.address, tls.credentials(), options=self._channel_options
            )
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._health_check = self._channel.unary_unary(
            HEALTH_CHECK_METHOD,
            request_serializer=None,
            response_deserializer=None,
        )

    @overload
    async def predict(
        self,
        model: str,
        images: list[Any] | tuple[Any, ...],
        *,
        version: str | int | None = None,
        top_k: int | None = None,
        threshold: float | None = None,
        thresholds: Mapping[str, float] | None = None,
        min_confidence: float | None = None,
        tta: bool | None = None,
        tta_views: int | None = None,
        all_scores: bool = False,
        raise_on_error: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> list[Prediction]: ...

    @overload
    async def predict(
        self,
        model: str,
        images: ImageInput,
        *,
        version: str | int | None = None,
        top_k: int | None = None,
        threshold: float | None = None,
        thresholds: Mapping[str, float] | None = None,
        min_confidence: float | None = None,
        tta: bool | None = None,
        tta_views: int | None = None,
        all_scores: bool = False,
        raise_on_error: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> Prediction: ...

    async def predict(
        self,
        model: str,
        images: ImageInput | list[Any] | tuple[Any, ...],
        *,
        version: str | int | None = None,
        top_k: int | None = None,
        threshold: float | None = None,
        thresholds: Mapping[str, float] | None = None,
        min_confidence: float | None = None,
        tta: bool | None = None,
        tta_views: int | None = None,
        all_scores: bool = False,
        raise_on_error: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> Prediction | list[Prediction]:
        """Predict one image (returns one result) or a list of them (returns a list), in one call.

        Options left as None take the model's configured defaults (see ``model_info``):
        ``top_k`` and ``min_confidence`` for classification; ``threshold``,
        per-label ``thresholds`` (they win over ``threshold``) and ``all_scores`` for
        multi-label; ``tta`` on/off and ``tta_views`` (how many configured views) for all.

        Per-input errors, splitting and failures are as for ``Client.predict``.
        """
        call = self._predict_call(
            model,
            version=version,
            top_k=top_k,
            threshold=threshold,
            thresholds=thresholds,
            min_confidence=min_confidence,
            tta=tta,
            tta_views=tta_views,
            all_scores=all_scores,
            timeout=timeout,
            metadata=metadata,
            raise_on_error=raise_on_error,
        )
        batch, many = as_batch(images)
        if len(batch) > 1:
            await self._fetch_limit(call)
        plan = BatchPlan(call, batch, self._batch_size(call, max(1, len(batch))), None)
        # Reading files and encoding arrays would stall the event loop.
        requests = await asyncio.to_thread(list, plan.requests())
        for request in requests:
            try:
                response = await self._stub.Predict(
                    request, timeout=call.timeout, metadata=call.metadata
                )
            except grpc.RpcError as error:
                raise self._translate(error, call.request_id) from None
            plan.accept(response, request.request_id)
        results = plan.results()
        return results if many else results[0]

    async def predict_many(
        self,
        model: str,
        images: Sequence[ImageInput],
        *,
        batch_size: int = 16,
        max_in_flight: int = 4,
        version: str | int | None = None,
        top_k: int | None = None,
        threshold: float | None = None,
        thresholds: Mapping[str, float] | None = None,
        min_confidence: float | None = None,
        tta: bool | None = None,
        tta_views: int | None = None,
        all_scores: bool = False,
        raise_on_error: bool = False,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        progress: ProgressCallback | None = None,
    ) -> list[Prediction]:
        """Predict a large collection over one ``PredictStream``; results in input order.

        Batching, per-input errors and broken streams are as for ``Client.predict_many``.
        """
        check_max_in_flight(max_in_flight)
        call = self._predict_call(
            model,
            version=version,
            top_k=top_k,
            threshold=threshold,
            thresholds=thresholds,
            min_confidence=min_confidence,
            tta=tta,
            tta_views=tta_views,
            all_scores=all_scores,
            timeout=timeout,
            metadata=metadata,
            raise_on_error=raise_on_error,
        )
        if len(images) > 1:
            await self._fetch_limit(call)
        plan = BatchPlan(call, images, self._batch_size(call, batch_size), progress)
        delays = resume_delays(self.retries)
        while not plan.finished:
            failure = await self._stream(plan, max_in_flight)
            if failure is None:
                break
            if should_resume(failure, plan, delays):
                await asyncio.sleep(delays.pop(0))
                continue
            give_up(failure, plan)
        return plan.results()

    async def _stream(self, plan: BatchPlan, max_in_flight: int) -> VisionRPCError | None:
        """One PredictStream over the plan's unanswered inputs; its failure, if it broke."""
        call = plan.call
        window = asyncio.Semaphore(max_in_flight)
        stream = self._stub.PredictStream(
            None,
            timeout=stream_timeout(call, plan.request_count, max_in_flight),
            metadata=call.metadata,
        )

        async def send() -> None:
            produced = plan.requests()
            while True:
                await window.acquire()
                # Reading files and encoding arrays would stall the event loop.
                request = await asyncio.to_thread(next, produced, None)
                if request is None:
                    break
                try:
                    await stream.write(request)
                except asyncio.InvalidStateError:
                    return  # the call has ended; the receiver reports its status
            await stream.done_writing()

        async def receive() -> None:
            while True:
                response = await stream.read()
                if not isinstance(response, pb.PredictResponse):
                    break  # grpc.aio.EOF: the server has answered everything
                plan.accept(response)
                window.release()

        sender = asyncio.ensure_future(send())
        receiver = asyncio.ensure_future(receive())
        try:
            # Whichever fails first (a request-level error, a broken stream) ends both.
            done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_EXCEPTION)
            for task in (sender, receiver):
                if task in done:
                    task.result()
        except grpc.RpcError as error:
            return self._translate(error, call.request_id)
        finally:
            for task in (sender, receiver):
                task.cancel()
            stream.cancel()
            # Collects the loser's outcome too, so no exception is left unretrieved.
            await asyncio.gather(sender, receiver, return_exceptions=True)
        return None

    async def _fetch_limit(self, call: PredictCall) -> None:
        """Learn the model's most images per request, once per model and version."""
        if self._knows_limit(call):
            return
        request = pb.GetModelInfoRequest(model=call.model, version=call.version)
        try:
            info = await self._stub.GetModelInfo(
                request, timeout=call.timeout, metadata=call.metadata
            )
        except grpc.RpcError as error:
            failure = self._translate(error, call.request_id)
            if failure.code != grpc.StatusCode.UNIMPLEMENTED:
                raise failure from None
            info = None  # a server without GetModelInfo states no limit
        self._learn_limit(call, info)

    async def models(self, *, timeout: float | None = None) -> list[ModelSummary]:
        """The models the server has loaded, sorted by name."""
        metadata, request_id = self._call_metadata(None)
        try:
            response = await self._stub.ListModels(
                pb.ListModelsRequest(), timeout=self._timeout(timeout), metadata=metadata
            )
        except grpc.RpcError as error:
            raise self._translate(error, request_id) from None
        return decode_models(response)

    async def model_info(
        self, name: str, version: str | int | None = None, *, timeout: float | None = None
    ) -> ModelInfo:
        """Task, labels, input geometry, default thresholds, TTA, provider and metrics of a model.

        Raises:
            ModelNotFoundError: no such model or version.
        """
        request = pb.GetModelInfoRequest(model=name, version=model_version(version))
        metadata, request_id = self._call_metadata(None)
        try:
            info = await self._stub.GetModelInfo(
                request, timeout=self._timeout(timeout), metadata=metadata
            )
        except grpc.RpcError as error:
            raise self._translate(error, request_id) from None
        return decode_model_info(info)

    async def health(
        self, model: str | None = None, *, timeout: float | None = None
    ) -> HealthStatus:
        """The server's (or one model's) ``grpc.health.v1`` status; truthy only when SERVING.

        Raises:
            ModelNotFoundError: the server does not know the model.
            UnavailableError: no server answered.
        """
        metadata, request_id = self._call_metadata(None)
        try:
            answer = await self._health_check(
                health_request_bytes(model or ""),
                timeout=self._timeout(timeout),
                metadata=metadata,
            )
        except grpc.RpcError as error:
            raise translate_health_error(self._translate(error, request_id), model) from None
        return health_status_from_bytes(answer)

    async def aclose(self) -> None:
        """Close the channel; calls in progress are cancelled."""
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
