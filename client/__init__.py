"""The visionrpc Python client (sync and asyncio) and the user-facing CLI commands.

::

    from visionrpc.client import Client

    with Client("127.0.0.1:8001") as client:
        result = client.predict("pets", "cat.jpg", top_k=3)
        print(result)

Only ``grpcio`` and ``protobuf`` are required; Pillow and numpy inputs work when
those libraries are installed. Errors form one tree rooted at ``VisionRPCError``
(see ``visionrpc.client.errors``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._async import AsyncClient
    from ._core import Metadata, ProgressCallback
    from ._sync import Client
    from .channel import RetryPolicy, TLSConfig
    from .errors import (
        DeadlineExceededError,
        InvalidInputError,
        ModelNotFoundError,
        OverloadedError,
        ServerError,
        UnauthenticatedError,
        UnavailableError,
        VisionRPCError,
    )
    from .inputs import ImageInput
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

# Where each public name lives. They load on first use, so that importing
# ``visionrpc.client.cli`` (to register the commands) does not load gRPC.
_HOMES = {
    "AsyncClient": "._async",
    "Client": "._sync",
    "Metadata": "._core",
    "ProgressCallback": "._core",
    "RetryPolicy": ".channel",
    "TLSConfig": ".channel",
    "ImageInput": ".inputs",
    **dict.fromkeys(
        [
            "DeadlineExceededError",
            "InvalidInputError",
            "ModelNotFoundError",
            "OverloadedError",
            "ServerError",
            "UnauthenticatedError",
            "UnavailableError",
            "VisionRPCError",
        ],
        ".errors",
    ),
    **dict.fromkeys(
        [
            "Classification",
            "HealthStatus",
            "ImageError",
            "LabelScore",
            "ModelInfo",
            "ModelSummary",
            "MultiLabel",
            "Point",
            "Points",
            "Prediction",
        ],
        ".results",
    ),
}

__all__ = [
    "AsyncClient",
    "Classification",
    "Client",
    "DeadlineExceededError",
    "HealthStatus",
    "ImageError",
    "ImageInput",
    "InvalidInputError",
    "LabelScore",
    "Metadata",
    "ModelInfo",
    "ModelNotFoundError",
    "ModelSummary",
    "MultiLabel",
    "OverloadedError",
    "Point",
    "Points",
    "Prediction",
    "ProgressCallback",
    "RetryPolicy",
    "ServerError",
    "TLSConfig",
    "UnauthenticatedError",
    "UnavailableError",
    "VisionRPCError",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
