"""The client's exception tree; gRPC errors are translated here and nowhere else.

::

    VisionRPCError                  any failure reported by the client
    ├── ModelNotFoundError          NOT_FOUND: unknown model or version
    ├── InvalidInputError           INVALID_ARGUMENT: bad image or option (also raised
    │                               client-side, before any call, for unusable inputs)
    ├── OverloadedError             RESOURCE_EXHAUSTED: the server's queue is full
    ├── DeadlineExceededError       DEADLINE_EXCEEDED: the call ran past its timeout
    ├── UnavailableError            UNAVAILABLE: no server reachable (after retries)
    ├── UnauthenticatedError        UNAUTHENTICATED: missing or wrong bearer token
    └── ServerError                 any other status (INTERNAL, UNKNOWN, CANCELLED, ...)

Every error carries the server's message and the ``grpc.StatusCode``; an error for
one image of a batch also carries that image's position in the request (``index``).
"""

from __future__ import annotations

import grpc


class VisionRPCError(Exception):
    """Base of every error the visionrpc client raises.

    Attributes:
        message: the server's explanation (or the client's, for client-side checks).
        code: the gRPC status the failure maps to.
        index: for a single image's failure, its position in the input; else None.
    """

    def __init__(self, message: str, code: grpc.StatusCode, index: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.index = index

    def __str__(self) -> str:
        where = f"image {self.index}: " if self.index is not None else ""
        return f"{self.code.name}: {where}{self.message}"


class ModelNotFoundError(VisionRPCError):
    """The model (or the requested version) is not loaded on the server."""


class InvalidInputError(VisionRPCError):
    """An image or an option was rejected (undecodable, too large, threshold out of range)."""


class OverloadedError(VisionRPCError):
    """The server's queue for the model is full; back off and try again."""


class DeadlineExceededError(VisionRPCError):
    """The call did not finish before its deadline."""


class UnavailableError(VisionRPCError):
    """No server answered (down, restarting, unreachable, TLS mismatch), retries included."""


class UnauthenticatedError(VisionRPCError):
    """The server wants a bearer token (``metadata=(("authorization", "Bearer ..."),)``)."""


class ServerError(VisionRPCError):
    """Any other failure status: an internal server error, a cancelled call, ..."""


_ERROR_BY_CODE: dict[grpc.StatusCode, type[VisionRPCError]] = {
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}

_CODE_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def status_code_from_number(number: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` for a numeric code as carried in ``visionrpc.v1.Status``."""
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def error_for_status(
    code: grpc.StatusCode, message: str, index: int | None = None
) -> VisionRPCError:
    """The exception of the tree that stands for ``code``."""
    return _ERROR_BY_CODE.get(code, ServerError)(message, code, index)


def translate_rpc_error(error: grpc.RpcError) -> VisionRPCError:
    """Turn a failed call into the client's exception for its status."""
    # A grpc.RpcError raised by a call is also a grpc.Call carrying code() and
    # details(); the bare base class has neither, hence the defensive lookups.
    code_of = getattr(error, "code", None)
    details_of = getattr(error, "details", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details = details_of() if callable(details_of) else None
    return error_for_status(code, details or f"the server answered {code.name} without details")
