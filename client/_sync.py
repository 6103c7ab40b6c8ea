"""``Client``: the blocking visionrpc client."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
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


class Client(ClientBase):
    """A blocking client for a visionrpc server, over one long-lived gRPC channel.

    Use it as a context manager (or call ``close()``)::

        with Client("127.0.0.1:8001") as client:
            result = client.predict("pets", "cat.jpg", top_k=3)
            print(result.label, result.score)

    Args:
        address: ``host:port`` of the server (any gRPC target, e.g. ``dns:///svc:8001``);
            None: ``$VISIONRPC_SERVER``, else ``127.0.0.1:8001``.
        token: bearer token sent with every call; None: ``$VISIONRPC_TOKEN`` when the
            address also comes from the environment, else no token.
        timeout: default deadline of every call, in seconds.
        retries: gRPC retry policy for UNAVAILABLE/RESOURCE_EXHAUSTED; None disables retries.
        tls: TLS settings; None for a plaintext channel.
        metadata: sent with every call, e.g. ``(("x-tenant", "a"),)``. Every call also
            sends an ``x-request-id`` (a new one unless given here or per call), which
            the server logs and every error carries as ``request_id``.
        max_message_bytes: largest request or response accepted.
        keepalive_seconds: interval of HTTP/2 keepalive pings; None to send none.
        load_balancing: ``"pick_first"`` or ``"round_robin"`` across resolved addresses.
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
            self._channel = grpc.insecure_channel(self.address, options=self._channel_options)
        else:
            self._channel = grpc.secure_channel(
                self.address, tls.credentials(), options=self._channel_options
            )
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._health_check = self._channel.unary_unary(
            HEALTH_CHECK_METHOD,
            request_serializer=None,
            response_deserializer=None,
        )

    @overload
    def predict(
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
    def predict(
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

    def predict(
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

        An input that cannot be used, by the client (a missing file, empty bytes, a
        wrong array) or by the server (an undecodable file), comes back as its own
        ``ImageError`` in its place, and the others are still predicted; with
        ``raise_on_error`` the first failed input's error is raised instead. A failure
        of the whole call (unknown model, bad option, server down) raises a
        ``VisionRPCError``. A list longer than the model's ``max_images_per_request``
        is sent as several requests. For large collections use ``predict_many``.
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
            self._fetch_limit(call)
        plan = BatchPlan(call, batch, self._batch_size(call, max(1, len(batch))), None)
        for request in plan.requests():
            try:
                response = self._stub.Predict(request, timeout=call.timeout, metadata=call.metadata)
            except grpc.RpcError as error:
                raise self._translate(error, call.request_id) from None
            plan.accept(response, request.request_id)
        results = plan.results()
        return results if many else results[0]

    def predict_many(
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

        The images are sent as requests of ``batch_size`` (at most the model's
        ``max_images_per_request``), at most ``max_in_flight`` unanswered at a time,
        and read (paths) or encoded only when their request is sent. ``timeout``
        bounds each request (the stream's deadline is one ``timeout`` per wave of
        ``max_in_flight`` requests). ``progress(done, total)`` is called after every
        answered request. Options and per-input errors are as for ``predict``.

        If the stream breaks (the server restarts, the connection drops), the inputs
        not yet answered are sent again on a new stream when retries are on, as many
        times as the retry policy's attempts allow; then, or without retries, each of
        them gets an ``ImageError`` with the failure's code (e.g. ``UNAVAILABLE``) and
        the results received are returned. If nothing at all was answered, the
        failure raises.
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
            self._fetch_limit(call)
        plan = BatchPlan(call, images, self._batch_size(call, batch_size), progress)
        delays = resume_delays(self.retries)
        while not plan.finished:
            failure = self._stream(plan, max_in_flight)
            if failure is None:
                break
            if should_resume(failure, plan, delays):
                time.sleep(delays.pop(0))
                continue
            give_up(failure, plan)
        return plan.results()

    def _stream(self, plan: BatchPlan, max_in_flight: int) -> VisionRPCError | None:
        """One PredictStream over the plan's unanswered inputs; its failure, if it broke."""
        call = plan.call
        window = threading.Semaphore(max_in_flight)
        stopped = threading.Event()

        def requests() -> Iterator[pb.PredictRequest]:
            # gRPC pulls this iterator from its own thread; the semaphore keeps at
            # most max_in_flight requests unanswered.
            produced = plan.requests()
            while True:
                window.acquire()
                if stopped.is_set():
                    return
                request = next(produced, None)
                if request is None:
                    return
                yield request

        responses = self._stub.PredictStream(
            requests(),
            timeout=stream_timeout(call, plan.request_count, max_in_flight),
            metadata=call.metadata,
        )
        try:
            for response in responses:
                plan.accept(response)
                window.release()
        except grpc.RpcError as error:
            return self._translate(error, call.request_id)
        finally:
            stopped.set()
            responses.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs
            window.release(max_in_flight)
        return None

    def _fetch_limit(self, call: PredictCall) -> None:
        """Learn the model's most images per request, once per model and version."""
        if self._knows_limit(call):
            return
        request = pb.GetModelInfoRequest(model=call.model, version=call.version)
        try:
            info = self._stub.GetModelInfo(request, timeout=call.timeout, metadata=call.metadata)
        except grpc.RpcError as error:
            failure = self._translate(error, call.request_id)
            if failure.code != grpc.StatusCode.UNIMPLEMENTED:
                raise failure from None
            info = None  # a server without GetModelInfo states no limit
        self._learn_limit(call, info)

    def models(self, *, timeout: float | None = None) -> list[ModelSummary]:
        """The models the server has loaded, sorted by name."""
        metadata, request_id = self._call_metadata(None)
        try:
            response = self._stub.ListModels(
                pb.ListModelsRequest(), timeout=self._timeout(timeout), metadata=metadata
            )
        except grpc.RpcError as error:
            raise self._translate(error, request_id) from None
        return decode_models(response)

    def model_info(
        self, name: str, version: str | int | None = None, *, timeout: float | None = None
    ) -> ModelInfo:
        """Task, labels, input geometry, default thresholds, TTA, provider and metrics of a model.

        Raises:
            ModelNotFoundError: no such model or version.
        """
        request = pb.GetModelInfoRequest(model=name, version=model_version(version))
        metadata, request_id = self._call_metadata(None)
        try:
            info = self._stub.GetModelInfo(
                request, timeout=self._timeout(timeout), metadata=metadata
            )
        except grpc.RpcError as error:
            raise self._translate(error, request_id) from None
        return decode_model_info(info)

    def health(self, model: str | None = None, *, timeout: float | None = None) -> HealthStatus:
        """The server's (or one model's) ``grpc.health.v1`` status; truthy only when SERVING.

        Raises:
            ModelNotFoundError: the server does not know the model.
            UnavailableError: no server answered.
        """
        metadata, request_id = self._call_metadata(None)
        try:
            answer = self._health_check(
                health_request_bytes(model or ""),
                timeout=self._timeout(timeout),
                metadata=metadata,
            )
        except grpc.RpcError as error:
            raise translate_health_error(self._translate(error, request_id), model) from None
        return health_status_from_bytes(answer)

    def close(self) -> None:
        """Close the channel; calls in progress are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
