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

Every error carries the server's message, the ``grpc.StatusCode`` and the call's
``request_id`` (the ``x-request-id`` the client sent, which the server logs); an error
for one image also carries that image's position in the caller's input (``index``).
"""

from __future__ import annotations

import grpc


class VisionRPCError(Exception):
    """Base of every error the visionrpc client raises.

    Attributes:
        message: the server's explanation (or the client's, for client-side checks).
        code: the gRPC status the failure maps to.
        index: for a single image's failure, its position in the input; else None.
        request_id: the call's ``x-request-id`` (search the server's access log for it);
            empty for mistakes caught before any call was made.
    """

    def __init__(
        self,
        message: str,
        code: grpc.StatusCode,
        index: int | None = None,
        request_id: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.index = index
        self.request_id = request_id

    def __str__(self) -> str:
        # Per-image messages already start with "image N" (see results.ImageError).
        request = f" (request {self.request_id})" if self.request_id else ""
        return f"{self.code.name}: {self.message}{request}"


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
    """The server wants a bearer token (``Client(..., token="...")``) or refused the one sent."""


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
    code: grpc.StatusCode, message: str, index: int | None = None, request_id: str = ""
) -> VisionRPCError:
    """The exception of the tree that stands for ``code``."""
    return _ERROR_BY_CODE.get(code, ServerError)(message, code, index, request_id)


def invalid_input(message: str) -> InvalidInputError:
    """A caller's mistake caught by the client before anything was sent."""
    return InvalidInputError(message, grpc.StatusCode.INVALID_ARGUMENT)


# What gRPC's transport says when the two ends disagree about TLS, and what to do about it.
_TLS_HINTS = (
    (
        ("WRONG_VERSION_NUMBER",),
        "TLS handshake failed: the server does not speak TLS; connect without TLS "
        "(no --tls/--ca; tls=None)",
    ),
    (
        ("CERTIFICATE_VERIFY_FAILED", "certificate signature failure", "BAD_SIGNATURE"),
        "TLS handshake failed: the server's certificate is not signed by the trusted CA "
        "(--ca; TLSConfig.root_certificates) or not issued for this address "
        "(TLSConfig.server_name)",
    ),
    (
        ("Socket closed",),
        "the server closed the TLS connection; if it requires mutual TLS, pass a client "
        "certificate and key it trusts (--cert/--key; TLSConfig.certificate_chain/private_key)",
    ),
    (("handshake",), "TLS handshake failed"),
)
_PLAINTEXT_TO_TLS_HINT = (
    "the server closed the connection; if it expects TLS, connect with TLS "
    "(--ca PEM or --tls; TLSConfig)"
)
_METADATA_LIMIT_MARKER = "metadata size exceeds"


def _explained(code: grpc.StatusCode, details: str, tls: bool) -> str:
    """The transport's message, with the likely cause first when it is a TLS mismatch."""
    if code != grpc.StatusCode.UNAVAILABLE:
        return details
    if tls:
        for markers, hint in _TLS_HINTS:
            if any(marker in details for marker in markers):
                return f"{hint} ({details})"
    elif "Socket closed" in details:
        return f"{_PLAINTEXT_TO_TLS_HINT} ({details})"
    return details


def translate_rpc_error(
    error: grpc.RpcError, request_id: str = "", *, tls: bool = False
) -> VisionRPCError:
    """Turn a failed call into the client's exception for its status.

    ``tls`` says whether the channel uses TLS, to explain handshake failures.
    """
    # A grpc.RpcError raised by a call is also a grpc.Call carrying code() and
    # details(); the bare base class has neither, hence the defensive lookups.
    code_of = getattr(error, "code", None)
    details_of = getattr(error, "details", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details = details_of() if callable(details_of) else None
    message = _explained(code, details or f"the server answered {code.name} without details", tls)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _METADATA_LIMIT_MARKER in message:
        # Oversized headers fail the same way every time: a caller's mistake, not overload.
        return InvalidInputError(
            f"metadata too large (the call's headers, or the server's answer to them): {message}",
            grpc.StatusCode.INVALID_ARGUMENT,
            request_id=request_id,
        )
    return error_for_status(code, message, request_id=request_id)
