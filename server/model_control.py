"""The ``visionrpc.v1.ModelControlService`` servicer: protobuf to ``ModelManager`` and back.

Domain errors map to status codes through the servicer's one error table
(``service.status_of``): NOT_FOUND for no such model folder, INVALID_ARGUMENT for a name
that cannot be a model's, FAILED_PRECONDITION for a mode that forbids the action or files
that do not load.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from visionrpc.protos import model_control_pb2 as pb
from visionrpc.protos import model_control_pb2_grpc as pb_grpc

from .model_manager import ModelManager
from .repository import ModelStatus, VersionState
from .service import status_of

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

STATES = {
    VersionState.LOADING: pb.VERSION_STATE_LOADING,
    VersionState.READY: pb.VERSION_STATE_READY,
    VersionState.UNLOADING: pb.VERSION_STATE_UNLOADING,
    VersionState.UNAVAILABLE: pb.VERSION_STATE_UNAVAILABLE,
}


class ModelControlServicer(pb_grpc.ModelControlServiceServicer):
    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        statuses = await self._manager.index()
        if request.ready_only:
            statuses = [status for status in statuses if status.state is VersionState.READY]
        return pb.RepositoryIndexResponse(models=[status_to_proto(s) for s in statuses])

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: Context
    ) -> pb.LoadModelResponse:
        status = await _answer(self._manager.load, request.name, context)
        return pb.LoadModelResponse(model=status_to_proto(status))

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: Context
    ) -> pb.UnloadModelResponse:
        status = await _answer(self._manager.unload, request.name, context)
        return pb.UnloadModelResponse(model=status_to_proto(status))

    async def ReloadModel(
        self, request: pb.ReloadModelRequest, context: Context
    ) -> pb.ReloadModelResponse:
        status = await _answer(self._manager.reload, request.name, context)
        return pb.ReloadModelResponse(model=status_to_proto(status))


async def _answer(
    action: Callable[[str], Awaitable[ModelStatus]], name: str, context: Context
) -> ModelStatus:
    try:
        return await action(name)
    except Exception as exc:
        code, message = status_of(exc)
        await context.abort(code, message)
        raise  # abort raises; this keeps the type checker sure nothing falls through


def status_to_proto(status: ModelStatus) -> pb.ModelStatus:
    return pb.ModelStatus(
        name=status.name,
        state=STATES[status.state],
        reason=status.reason,
        versions=[
            pb.VersionStatus(version=str(v.version), state=STATES[v.state], reason=v.reason)
            for v in status.versions
        ],
    )
