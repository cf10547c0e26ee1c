"""The one error model of tunemesh, raised by the SDK and the services alike, and its wire form.

Every error carries a gRPC status code (implied by its class), a stable REASON and a
message for people. Services raise them as `InvalidArgumentError("BAD_TOKEN", "token 7 is
...")`; the SDK raises them for a failed call or operation.

On the wire a failed call ends with the standard gRPC rich status: the status code, the
message as the status details, and in the `grpc-status-details-bin` trailer a
`google.rpc.Status` holding one `google.rpc.ErrorInfo` (reason = the REASON, domain
`tunemesh`). The server interceptor builds it with `to_status`; every client, the SDK and
the services calling each other, reads it back with `error_from_rpc`. A failed Operation
carries the same code (a `google.rpc.Code` number), reason and message in `OperationError`
(`error_for` rebuilds the error).

Tinker's names (`import tunemesh as tinker`) are these classes or their bases, so an
`except tinker.X` catches what tunemesh raises: TinkerError and APIError are
TunemeshError, BadRequestError is InvalidArgumentError, AuthenticationError
UnauthenticatedError, RateLimitError ResourceExhaustedError, APITimeoutError
DeadlineExceededError, and APIConnectionError a second base of UnavailableError and
DeadlineExceededError (as Tinker's APITimeoutError is an APIConnectionError).
NotFoundError and PermissionDeniedError have the same name in both.

A request gRPC itself refuses for its size (this client's send limit or the server's
receive limit) becomes INVALID_ARGUMENT [REQUEST_TOO_LARGE], as the service reports
requests over its own limits: it never reached the service, and sending it again fails
the same way.
"""

from __future__ import annotations

import enum
import re

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "tunemesh"  # ErrorInfo.domain of every tunemesh error
REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
# Longest message a status carries, in UTF-8 bytes: it travels twice in the trailers
# (grpc-message, percent-encoded, and the status details), which a client refuses past
# 16 KiB; a message quoting a huge request field is cut here, not lost with its reason.
MAX_STATUS_MESSAGE_BYTES = 1024

# gRPC's own details when a request is over a message size limit, e.g.
# "CLIENT: Sent message larger than max (2509 vs. 2000)". Only these two mean the
# request was never handled ("CLIENT: Received" is a response over our receive limit).
_SIZE_REFUSAL = re.compile(
    r"(?:CLIENT: Sent|SERVER: Received) message larger than max \((\d+) vs\. (\d+)\)"
)


class Code(enum.IntEnum):
    """google.rpc.Code: the numbers of the grpc.StatusCode values, as `OperationError.code`
    carries them (and code that does not import grpc, like the scheduler core, names them)."""

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


_STATUS_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}


class TunemeshError(Exception):
    """Base of every tunemesh error: `.code` (grpc.StatusCode), `.reason`, `.message`.

    `SomeError(reason, message)` has its class's code; `code=` overrides it (the base
    class is UNKNOWN unless told).
    """

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self, reason: str = "", message: str = "", *, code: grpc.StatusCode | int | None = None
    ) -> None:
        self.code = _to_status(code if code is not None else self.default_code)
        self.reason = reason
        self.message = message
        super().__init__(self._describe())

    @property
    def rpc_code(self) -> Code:
        """`code` as its google.rpc.Code number."""
        return Code(self.code.value[0])

    def _describe(self) -> str:
        head = self.code.name + (f" [{self.reason}]" if self.reason else "")
        return f"{head}: {self.message}" if self.message else head

    def __repr__(self) -> str:
        code = f", code=grpc.StatusCode.{self.code.name}" if self.code is not self.default_code else ""
        return f"{type(self).__name__}({self.reason!r}, {self.message!r}{code})"


TinkerError = TunemeshError
APIError = TunemeshError


class APIConnectionError(Exception):
    """Tinker's name for "the service could not be reached or did not answer in time": a
    second base of UnavailableError and DeadlineExceededError (which are TunemeshErrors),
    so `except APIConnectionError` catches both. tunemesh raises only those two."""


class CancelledError(TunemeshError):
    default_code = grpc.StatusCode.CANCELLED


class InvalidArgumentError(TunemeshError):
    default_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(TunemeshError, APIConnectionError):
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


class UnavailableError(TunemeshError, APIConnectionError):
    default_code = grpc.StatusCode.UNAVAILABLE


class DataLossError(TunemeshError):
    default_code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(TunemeshError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


class ClientClosedError(TunemeshError):
    """The client was closed while the call was still pending."""

    default_code = grpc.StatusCode.CANCELLED


BadRequestError = InvalidArgumentError
AuthenticationError = UnauthenticatedError
RateLimitError = ResourceExhaustedError
APITimeoutError = DeadlineExceededError

_CLASS_BY_CODE = {
    cls.default_code: cls
    for cls in TunemeshError.__subclasses__()
    if cls is not ClientClosedError
}


def error_for(code: grpc.StatusCode | int, reason: str = "", message: str = "") -> TunemeshError:
    """The typed error for a status code (google.rpc.Code number or grpc.StatusCode)."""
    status = _to_status(code)
    return _CLASS_BY_CODE.get(status, TunemeshError)(reason, message, code=status)


def request_too_large(what: str, size: int, limit: int, detail: str = "") -> InvalidArgumentError:
    """The error for a request of `size` bytes over a `limit`-byte message limit."""
    message = f"{what} is {size} bytes, over the limit of {limit} bytes per request"
    message += f" ({detail})" if detail else ""
    return InvalidArgumentError(REQUEST_TOO_LARGE, message + "; send less data per call")


def to_status(err: TunemeshError) -> grpc.Status:
    """The rich status a server ends a call with for `err`: its code, its message (cut to
    MAX_STATUS_MESSAGE_BYTES) as the details, and a `google.rpc.Status` with an `ErrorInfo` (reason, domain) in the
    `grpc-status-details-bin` trailer. With grpc.aio:
    `await context.abort(status.code, status.details, status.trailing_metadata)`."""
    status = status_pb2.Status(code=err.code.value[0], message=_bounded(err.message))
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN))
    return rpc_status.to_status(status)


def _bounded(message: str) -> str:
    data = message.encode()
    if len(data) <= MAX_STATUS_MESSAGE_BYTES:
        return message
    return data[: MAX_STATUS_MESSAGE_BYTES - 3].decode(errors="ignore") + "..."


def error_from_rpc(err: grpc.RpcError) -> TunemeshError:
    """The typed error of a failed gRPC call (sync or grpc.aio): code and message from the
    status, reason from its rich status's tunemesh ErrorInfo ("" when it has none: the
    call failed outside tunemesh code, e.g. in transport or a crash)."""
    code = _call_attr(err, "code") or grpc.StatusCode.UNKNOWN
    message = _call_attr(err, "details") or ""
    reason = _reason(err)
    refusal = _SIZE_REFUSAL.search(message)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and not reason and refusal:
        return request_too_large("the request", int(refusal[1]), int(refusal[2]), f"grpc: {message}")
    return error_for(code, reason, message)


def _reason(err: grpc.RpcError) -> str:
    """The reason of the tunemesh ErrorInfo in the call's rich status, else ""."""
    if _call_attr(err, "trailing_metadata") is None:
        return ""
    try:
        status = rpc_status.from_call(err)
    except (ValueError, DecodeError):  # not a status we sent (unreadable, or not this call's)
        return ""
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == DOMAIN:
            return info.reason
    return ""


def _call_attr(err: grpc.RpcError, name: str):
    method = getattr(err, name, None)
    return method() if callable(method) else None


def _to_status(code: grpc.StatusCode | int) -> grpc.StatusCode:
    if isinstance(code, grpc.StatusCode):
        return code
    return _STATUS_BY_VALUE.get(int(code), grpc.StatusCode.UNKNOWN)
