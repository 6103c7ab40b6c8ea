"""The Open Inference Protocol (KServe V2) servicer, ``inference.GRPCInferenceService``.

As thin as the visionrpc.v1 servicer and over the same pipeline: ModelInfer becomes the
same ``Pipeline.predict`` call (the same admission, batcher queue, preprocessing,
thresholds and TTA), and is counted in the same metrics and access log by
``interceptors.ObservabilityInterceptor``, which reads its messages. The tensor
mapping lives in ``oip_codec``. Readiness follows ``grpc.health.v1``: a draining server,
or a model that is not SERVING, is not ready.

The repository extension goes to the ``ModelManager``: RepositoryIndex always (every
model folder, each version's state), RepositoryModelLoad and Unload only where the model
control API is on (``--model-control-api on``; app.py guards those two with the control
token, not the inference one); elsewhere they answer UNIMPLEMENTED saying how to enable them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor

import visionrpc
from visionrpc.protos.inference import grpc_predict_v2_pb2 as v2
from visionrpc.protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc

from . import oip_codec
from .errors import InvalidInput, VisionRPCError
from .health import SERVING, HealthServicer
from .model_manager import ModelManager
from .pipeline import Pipeline, PredictOutcome, held_at_arrival
from .repository import LoadedModel, ModelRepository, VersionState
from .service import (
    Context,
    abort_with_hint,
    answer_in_completion_order,
    call_deadline,
    status_of,
)

SERVICE_NAME = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "visionrpc"
# Triton's extension names, for what this server answers beyond the core protocol.
EXTENSIONS = ("model_configuration", "model_repository", "parameters")
# The repository extension's calls that change what serves: the model control API's.
CONTROL_METHODS = ("RepositoryModelLoad", "RepositoryModelUnload")
# The rest, which the inference token guards.
INFERENCE_METHODS = tuple(
    method.name
    for method in v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
    if method.name not in CONTROL_METHODS
)
NO_MODEL_CONTROL = (
    "model control is off on this server: start it with --model-control-api on "
    "(and --model-control explicit) to load and unload models"
)


class OpenInferenceServicer(v2_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        pipeline: Pipeline,
        repository: ModelRepository,
        health: HealthServicer,
        manager: ModelManager,
        *,
        model_control: bool,
        stream_max_in_flight: int,
    ) -> None:
        """``model_control``: whether RepositoryModelLoad and Unload may change what serves."""
        self._stream_max_in_flight = stream_max_in_flight
        self._pipeline = pipeline
        self._repository = repository
        self._health = health
        self._manager = manager
        self._model_control = model_control

    async def ServerLive(
        self, request: v2.ServerLiveRequest, context: Context
    ) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: v2.ServerReadyRequest, context: Context
    ) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self._health.status("") == SERVING)

    async def ModelReady(
        self, request: v2.ModelReadyRequest, context: Context
    ) -> v2.ModelReadyResponse:
        try:
            self._repository.get(request.name, request.version)
        except VisionRPCError:
            return v2.ModelReadyResponse(ready=False)
        return v2.ModelReadyResponse(ready=self._health.status(request.name) == SERVING)

    async def ServerMetadata(
        self, request: v2.ServerMetadataRequest, context: Context
    ) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(
            name=SERVER_NAME, version=visionrpc.__version__, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(
        self, request: v2.ModelMetadataRequest, context: Context
    ) -> v2.ModelMetadataResponse:
        model = await self._model(request.name, request.version, context)
        return oip_codec.model_metadata(model, self._repository.versions(model.name))

    async def ModelConfig(
        self, request: v2.ModelConfigRequest, context: Context
    ) -> v2.ModelConfigResponse:
        model = await self._model(request.name, request.version, context)
        return oip_codec.model_config(model)

    async def ModelInfer(
        self, request: v2.ModelInferRequest, context: Context
    ) -> v2.ModelInferResponse:
        try:
            response = await self._infer(request, call_deadline(context))
        except Exception as exc:
            code, message = status_of(_in_request_terms(exc))
            await abort_with_hint(context, code, message, exc)
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[v2.ModelInferRequest], context: Context
    ) -> AsyncIterator[v2.ModelStreamInferResponse]:
        """Triton's stream: answers in completion order, at most ``stream_max_in_flight`` at once.

        A request's failure is its own response's ``error_message`` ("<STATUS>: <why>"); the
        stream goes on. A slot frees only once its answer is sent, so a client that stops
        reading stops the server from reading more of its requests.
        """
        deadline = call_deadline(context)
        async for response in answer_in_completion_order(
            request_iterator,
            lambda request: self._stream_answer(request, deadline),
            self._stream_max_in_flight,
        ):
            yield response

    async def _stream_answer(
        self, request: v2.ModelInferRequest, deadline: float | None
    ) -> v2.ModelStreamInferResponse:
        try:
            response = await self._infer(request, deadline)
        except Exception as exc:
            code, message = status_of(_in_request_terms(exc))
            return v2.ModelStreamInferResponse(error_message=f"{code.name}: {message}")
        if oip_codec.FINAL_RESPONSE_WANTED in request.parameters:
            # Each request has exactly one response here, so every response is the final one.
            response.parameters[oip_codec.FINAL_RESPONSE].bool_param = True
        return v2.ModelStreamInferResponse(infer_response=response)

    async def _infer(
        self, request: v2.ModelInferRequest, deadline: float | None
    ) -> v2.ModelInferResponse:
        infer = oip_codec.infer_call(request)
        # Checked before any work; an unknown model fails here as in the pipeline.
        model = self._repository.get(infer.call.model, infer.call.version)
        oip_codec.check_outputs(model.config, infer.outputs)
        outcome = await self._pipeline.predict(infer.call, deadline, held_at_arrival())
        response = oip_codec.infer_response(outcome, request, infer.outputs)
        _fail_when_every_image_failed(outcome)
        return response

    async def RepositoryIndex(
        self, request: v2.RepositoryIndexRequest, context: Context
    ) -> v2.RepositoryIndexResponse:
        index = v2.RepositoryIndexResponse()
        for status in await self._manager.index():
            if not status.versions and not request.ready:
                index.models.add(name=status.name, state=status.state.value, reason=status.reason)
            for version in status.versions:
                if request.ready and version.state is not VersionState.READY:
                    continue
                index.models.add(
                    name=status.name,
                    version=str(version.version),
                    state=version.state.value,
                    reason=version.reason or status.reason,
                )
        return index

    async def RepositoryModelLoad(
        self, request: v2.RepositoryModelLoadRequest, context: Context
    ) -> v2.RepositoryModelLoadResponse:
        await self._control(self._manager.load, request.model_name, request.parameters, context)
        return v2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: v2.RepositoryModelUnloadRequest, context: Context
    ) -> v2.RepositoryModelUnloadResponse:
        await self._control(self._manager.unload, request.model_name, request.parameters, context)
        return v2.RepositoryModelUnloadResponse()

    async def _control(
        self,
        action: Callable[[str], Awaitable[object]],
        name: str,
        parameters: Mapping[str, v2.ModelRepositoryParameter],
        context: Context,
    ) -> None:
        if not self._model_control:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, NO_MODEL_CONTROL)
        # Models have no dependents here (no ensembles), so tritonclient's unload_dependents
        # changes nothing; Triton's config overrides and file uploads are refused: models
        # load from their folder only.
        unsupported = sorted(set(parameters) - {"unload_dependents"})
        if unsupported:
            listed = ", ".join(oip_codec.quoted(key) for key in unsupported)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"parameters: not supported ({listed})"
            )
        try:
            await action(name)
        except VisionRPCError as exc:
            code, message = status_of(exc)
            await context.abort(code, message)

    async def _model(self, name: str, version: str, context: Context) -> LoadedModel:
        try:
            return self._repository.get(name, version)
        except VisionRPCError as exc:
            code, message = status_of(exc)
            await context.abort(code, message)


def reflection_pool(served: Sequence[FileDescriptor]) -> descriptor_pool.DescriptorPool:
    """One pool with the served files, this protocol's and their imports, for reflection.

    The Open Inference Protocol's file lives in a pool of its own (see protos/generate.py),
    where server reflection, which reads one pool, would not find it otherwise.
    """
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        added.add(file.name)
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)

    for file in (*served, v2.DESCRIPTOR):
        add(file)
    return pool


def _in_request_terms(error: Exception) -> Exception:
    return oip_codec.in_parameter_terms(error) if isinstance(error, InvalidInput) else error


def _fail_when_every_image_failed(outcome: PredictOutcome) -> None:
    """With no image answered there is nothing to return: the first image's error is the call's."""
    errors = [result for result in outcome.results if isinstance(result, VisionRPCError)]
    if errors and len(errors) == len(outcome.results):
        raise errors[0]


__all__ = [
    "CONTROL_METHODS",
    "INFERENCE_METHODS",
    "SERVICE_NAME",
    "OpenInferenceServicer",
    "reflection_pool",
]
