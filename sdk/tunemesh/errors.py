"""Errors the SDK raises: a gRPC status code, a stable REASON and a message for people.

The server puts the REASON in the trailing metadata key `tunemesh-reason` and the human
message in the status details; a failed Operation carries both in `OperationError`.
A request gRPC itself refuses for its size (this client's send limit or the server's
receive limit) becomes INVALID_ARGUMENT [REQUEST_TOO_LARGE], as the service reports
requests over its own limits: it never reached the service, and sending it again fails
the same way.
"""

from __future__ import annotations

import re

import grpc

REASON_METADATA_KEY = "tunemesh-reason"
REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"

# gRPC's own details when a request is over a message size limit, e.g.
# "CLIENT: Sent message larger than max (2509 vs. 2000)". Only these two mean the
# request was never handled ("CLIENT: Received" is a response over our receive limit).
_SIZE_REFUSAL = re.compile(
    r"(?:CLIENT: Sent|SERVER: Received) message larger than max \((\d+) vs\. (\d+)\)"
)

_STATUS_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}


class TunemeshError(Exception):
    """Base of every error the SDK raises for a failed call or operation."""

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        code: grpc.StatusCode | int | None = None,
        reason: str = "",
        message: str = "",
    ) -> None:
        self.code = _to_status(code if code is not None else self.default_code)
        self.reason = reason
        self.message = message
        super().__init__(self._describe())

    def _describe(self) -> str:
        head = self.code.name + (f" [{self.reason}]" if self.reason else "")
        return f"{head}: {self.message}" if self.message else head

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.reason!r}, {self.message!r})"


class CancelledError(TunemeshError):
    default_code = grpc.StatusCode.CANCELLED


class InvalidArgumentError(TunemeshError):
    default_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(TunemeshError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(TunemeshError):
    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(TunemeshError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(TunemeshError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(TunemeshError):
    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(TunemeshError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(TunemeshError):
    default_code = grpc.StatusCode.ABORTED


class UnimplementedError(TunemeshError):
    default_code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(TunemeshError):
    default_code = grpc.StatusCode.INTERNAL


class UnavailableError(TunemeshError):
    default_code = grpc.StatusCode.UNAVAILABLE


class UnauthenticatedError(TunemeshError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


class ClientClosedError(TunemeshError):
    """The client was closed while the call was still pending."""

    default_code = grpc.StatusCode.CANCELLED


_CLASS_BY_CODE = {
    cls.default_code: cls
    for cls in TunemeshError.__subclasses__()
    if cls is not ClientClosedError
}


def error_for(code: grpc.StatusCode | int, reason: str = "", message: str = "") -> TunemeshError:
    """Build the typed error for a status code (int google.rpc.Code or grpc.StatusCode)."""
    status = _to_status(code)
    return _CLASS_BY_CODE.get(status, TunemeshError)(status, reason, message)


def request_too_large(what: str, size: int, limit: int, detail: str = "") -> InvalidArgumentError:
    """The error for a request of `size` bytes over a `limit`-byte message limit."""
    message = f"{what} is {size} bytes, over the limit of {limit} bytes per request"
    message += f" ({detail})" if detail else ""
    return InvalidArgumentError(reason=REQUEST_TOO_LARGE, message=message + "; send less data per call")


def error_from_rpc(err: grpc.RpcError) -> TunemeshError:
    """Map a failed gRPC call to a typed error, reading the reason from trailing metadata."""
    code = _call_attr(err, "code") or grpc.StatusCode.UNKNOWN
    message = _call_attr(err, "details") or ""
    reason = ""
    for key, value in _call_attr(err, "trailing_metadata") or ():
        if key == REASON_METADATA_KEY:
            reason = value.decode() if isinstance(value, bytes) else str(value)
    refusal = _SIZE_REFUSAL.search(message)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and not reason and refusal:
        return request_too_large("the request", int(refusal[1]), int(refusal[2]), f"grpc: {message}")
    return error_for(code, reason, message)


def _call_attr(err: grpc.RpcError, name: str):
    method = getattr(err, name, None)
    return method() if callable(method) else None


def _to_status(code: grpc.StatusCode | int) -> grpc.StatusCode:
    if isinstance(code, grpc.StatusCode):
        return code
    return _STATUS_BY_VALUE.get(int(code), grpc.StatusCode.UNKNOWN)
