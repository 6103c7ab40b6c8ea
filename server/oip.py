"""The Open Inference Protocol (KServe V2) servicer, ``inference.GRPCInferenceService``.

As thin as the visionrpc.v1 servicer and over the same pipeline: ModelInfer becomes the
same ``Pipeline.predict`` call (the same admission, batcher queue, preprocessing,
thresholds and TTA), and is counted in the same metrics and access log by
``interceptors.ObservabilityInterceptor``, which reads its messages. The tensor
mapping lives in ``oip_codec``. Readiness follows ``grpc.health.v1``: a draining server,
or a model that is not SERVING, is not ready.

The repository extension's index lists what the repository holds; loading and unloading
models at run time is not available yet, and says so (UNIMPLEMENTED).
"""

from __future__ import annotations

import grpc

import visionrpc
from visionrpc.protos.inference import grpc_predict_v2_pb2 as v2
from visionrpc.protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc

from . import oip_codec
from .errors import InvalidInput, VisionRPCError
from .health import SERVING, HealthServicer
from .pipeline import Pipeline, PredictOutcome
from .repository import LoadedModel, ModelRepository
from .service import Context, _deadline, status_of

SERVICE_NAME = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "visionrpc"
# Triton's extension names, for what this server answers beyond the core protocol.
EXTENSIONS = ("model_configuration", "parameters")
NO_MODEL_CONTROL = (
    "model control is not available: this server loads its repository at start, "
    "so restart it to add, remove or reload models"
)


class OpenInferenceServicer(v2_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        pipeline: Pipeline,
        repository: ModelRepository,
        health: HealthServicer,
    ) -> None:
        self._pipeline = pipeline
        self._repository = repository
        self._health = health

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
            infer = oip_codec.infer_call(request)
            # Checked before any work; an unknown model fails here as in the pipeline.
            model = self._repository.get(infer.call.model, infer.call.version)
            oip_codec.check_outputs(model.config, infer.outputs)
            outcome = await self._pipeline.predict(infer.call, _deadline(context))
            response = oip_codec.infer_response(outcome, request, infer.outputs)
            _fail_when_every_image_failed(outcome)
        except Exception as exc:
            error = oip_codec.in_parameter_terms(exc) if isinstance(exc, InvalidInput) else exc
            code, message = status_of(error)
            await context.abort(code, message)
        return response

    async def RepositoryIndex(
        self, request: v2.RepositoryIndexRequest, context: Context
    ) -> v2.RepositoryIndexResponse:
        index = v2.RepositoryIndexResponse()
        for model in self._repository.loaded():
            index.models.add(name=model.name, version=str(model.version), state="READY")
        if not request.ready:
            for failure in self._repository.failures:
                # The reason names server paths, so it stays in the server's log.
                index.models.add(
                    name=failure.model,
                    state="UNAVAILABLE",
                    reason="failed to load (the server log says why)",
                )
        return index

    async def RepositoryModelLoad(
        self, request: v2.RepositoryModelLoadRequest, context: Context
    ) -> v2.RepositoryModelLoadResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, NO_MODEL_CONTROL)

    async def RepositoryModelUnload(
        self, request: v2.RepositoryModelUnloadRequest, context: Context
    ) -> v2.RepositoryModelUnloadResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, NO_MODEL_CONTROL)

    async def _model(self, name: str, version: str, context: Context) -> LoadedModel:
        try:
            return self._repository.get(name, version)
        except VisionRPCError as exc:
            code, message = status_of(exc)
            await context.abort(code, message)


def _fail_when_every_image_failed(outcome: PredictOutcome) -> None:
    """With no image answered there is nothing to return: the first image's error is the call's."""
    errors = [result for result in outcome.results if isinstance(result, VisionRPCError)]
    if errors and len(errors) == len(outcome.results):
        raise errors[0]


__all__ = ["SERVICE_NAME", "OpenInferenceServicer"]
