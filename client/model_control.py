"""A client for ``visionrpc.v1.ModelControlService``: load, unload, reload, repository index.

::

    from visionrpc.client.model_control import ModelControlClient

    with ModelControlClient("127.0.0.1:8001", token="admin-secret") as control:
        control.load("pets")
        for model in control.index():
            print(model.name, model.state, [(v.version, v.state) for v in model.versions])

The server serves it only with ``--model-control-api on``; load, unload and reload also
need ``--model-control explicit``. Failures raise the client's ``VisionRPCError`` tree.
No retries: a load is not something to repeat behind the caller's back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

import grpc

from visionrpc.protos import model_control_pb2 as pb
from visionrpc.protos import model_control_pb2_grpc as pb_grpc

from .channel import TLSConfig
from .errors import translate_rpc_error


@dataclass(frozen=True)
class VersionState:
    version: str
    # LOADING, READY, UNLOADING or UNAVAILABLE.
    state: str
    reason: str


@dataclass(frozen=True)
class ModelState:
    name: str
    state: str
    reason: str
    versions: tuple[VersionState, ...]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["versions"] = [asdict(version) for version in self.versions]
        return data


def _state_name(value: int) -> str:
    return pb.VersionState.Name(value).removeprefix("VERSION_STATE_")  # type: ignore[arg-type]


def state_from_proto(status: pb.ModelStatus) -> ModelState:
    return ModelState(
        name=status.name,
        state=_state_name(status.state),
        reason=status.reason,
        versions=tuple(
            VersionState(version=v.version, state=_state_name(v.state), reason=v.reason)
            for v in status.versions
        ),
    )


class ModelControlClient:
    def __init__(
        self,
        address: str,
        *,
        timeout: float = 120.0,
        tls: TLSConfig | None = None,
        token: str | None = None,
    ) -> None:
        """``timeout``: seconds per call; a load includes the model's warm-up."""
        self._timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if tls is None:
            self._channel = grpc.insecure_channel(address)
        else:
            self._channel = grpc.secure_channel(address, tls.credentials())
        self._stub = pb_grpc.ModelControlServiceStub(self._channel)

    def index(self, *, ready_only: bool = False) -> list[ModelState]:
        response = self._call(
            self._stub.RepositoryIndex, pb.RepositoryIndexRequest(ready_only=ready_only)
        )
        return [state_from_proto(model) for model in response.models]

    def load(self, name: str) -> ModelState:
        return state_from_proto(
            self._call(self._stub.LoadModel, pb.LoadModelRequest(name=name)).model
        )

    def unload(self, name: str) -> ModelState:
        response = self._call(self._stub.UnloadModel, pb.UnloadModelRequest(name=name))
        return state_from_proto(response.model)

    def reload(self, name: str) -> ModelState:
        response = self._call(self._stub.ReloadModel, pb.ReloadModelRequest(name=name))
        return state_from_proto(response.model)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ModelControlClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise translate_rpc_error(error) from None
