"""Domain errors of the serving core, free of gRPC.

Each error carries a kind; the servicer owns the one table that turns kinds into
gRPC status codes, so the batcher, preprocessing and runtime never import grpc.

    VisionRPCError
    ├── InvalidInput        INVALID_ARGUMENT
    ├── ModelNotFound       NOT_FOUND
    ├── Overloaded          RESOURCE_EXHAUSTED
    ├── DeadlineExceeded    DEADLINE_EXCEEDED
    ├── Cancelled           CANCELLED
    ├── Unavailable         UNAVAILABLE
    └── FailedPrecondition  FAILED_PRECONDITION (model control: not in this mode, or
                            the repository's files do not load)
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    UNAVAILABLE = "unavailable"
    FAILED_PRECONDITION = "failed_precondition"
    INTERNAL = "internal"


class VisionRPCError(Exception):
    """Base of every error the server reports to callers on purpose."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str, *, retry_after_seconds: float | None = None) -> None:
        """``retry_after_seconds``: when a retry may succeed, for errors that mean "not now"."""
        super().__init__(message)
        self.message = message
        self.retry_after_seconds = retry_after_seconds


class InvalidInput(VisionRPCError):
    kind = ErrorKind.INVALID_ARGUMENT


class ModelNotFound(VisionRPCError):
    kind = ErrorKind.NOT_FOUND


class Overloaded(VisionRPCError):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class DeadlineExceeded(VisionRPCError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class Cancelled(VisionRPCError):
    kind = ErrorKind.CANCELLED


class Unavailable(VisionRPCError):
    kind = ErrorKind.UNAVAILABLE


class FailedPrecondition(VisionRPCError):
    kind = ErrorKind.FAILED_PRECONDITION
