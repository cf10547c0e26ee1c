"""Typed errors: each carries a gRPC status code and a stable REASON.

Core and engine code raise these; one server interceptor maps them to a status.
Nothing here imports grpc: codes are the integers of google.rpc.Code.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """google.rpc.Code values."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TunemeshError(Exception):
    """An error with a gRPC code, a machine-readable reason and a message for people."""

    code: Code = Code.INTERNAL

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, {self.message!r})"


class InvalidArgument(TunemeshError):
    code = Code.INVALID_ARGUMENT


class NotFound(TunemeshError):
    code = Code.NOT_FOUND


class AlreadyExists(TunemeshError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(TunemeshError):
    code = Code.FAILED_PRECONDITION


class ResourceExhausted(TunemeshError):
    code = Code.RESOURCE_EXHAUSTED


class Unavailable(TunemeshError):
    code = Code.UNAVAILABLE


class Unauthenticated(TunemeshError):
    code = Code.UNAUTHENTICATED


class PermissionDenied(TunemeshError):
    code = Code.PERMISSION_DENIED


class Unimplemented(TunemeshError):
    code = Code.UNIMPLEMENTED


class Cancelled(TunemeshError):
    code = Code.CANCELLED


class Internal(TunemeshError):
    code = Code.INTERNAL


class DataLoss(TunemeshError):
    code = Code.DATA_LOSS


_BY_CODE = {cls.code: cls for cls in TunemeshError.__subclasses__()}


def error_for(code: int, reason: str, message: str) -> TunemeshError:
    """Rebuild a typed error from its wire form (code, reason, message)."""
    cls = _BY_CODE.get(Code(code), TunemeshError)
    err = cls(reason, message)
    if cls is TunemeshError:
        err.code = Code(code)
    return err
