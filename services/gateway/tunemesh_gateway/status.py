"""How failures reach a Tinker client: HTTP statuses with a JSON body, and failed futures.

The SDK retries 408, 409, 429 and 5xx for minutes, re-submits a sample on 410 and fails
other 4xx at once; a 400 with an empty body reads as a proxy fault and is retried. So
every error answer carries `{"detail": ...}`, and a code the caller cannot fix by
retrying never maps to 409 (ALREADY_EXISTS is a 400 here).
"""

from __future__ import annotations

from tunemesh.errors import Code, TunemeshError

HTTP_BY_CODE = {
    Code.INVALID_ARGUMENT: 400,
    Code.FAILED_PRECONDITION: 400,
    Code.ALREADY_EXISTS: 400,
    Code.OUT_OF_RANGE: 400,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.NOT_FOUND: 404,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.CANCELLED: 503,
    Code.DEADLINE_EXCEEDED: 503,
    Code.ABORTED: 503,
    Code.UNAVAILABLE: 503,
    Code.UNIMPLEMENTED: 400,
    Code.DATA_LOSS: 500,
    Code.INTERNAL: 500,
    Code.UNKNOWN: 500,
}
USER_CODES = frozenset({Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS, Code.FAILED_PRECONDITION,
                        Code.OUT_OF_RANGE})
"""Codes whose failed future is the caller's fault (`category: user`)."""


class HttpError(Exception):
    """An answer the gateway itself decides: `status` with `{"detail": detail}`."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class Unsupported(HttpError):
    """A Tinker feature tunemesh does not offer: 400 `unsupported: <what>`."""

    def __init__(self, what: str) -> None:
        super().__init__(400, f"unsupported: {what}")


class Gone(HttpError):
    """410: an expired future (the SDK re-submits a sample) or a finished session."""

    def __init__(self, detail: str) -> None:
        super().__init__(410, detail)


def http_status(err: TunemeshError) -> int:
    """The HTTP status of a failed scheduler call."""
    return HTTP_BY_CODE.get(err.rpc_code, 500)


def detail(err: TunemeshError) -> str:
    """`REASON: message`, what a Tinker user reads in the SDK's exception."""
    if err.reason and err.message:
        return f"{err.reason}: {err.message}"
    return err.reason or err.message or err.code.name


def failed_future(code: int, reason: str, message: str) -> dict[str, str]:
    """The body of a future that finished with an error (HTTP 200, the SDK raises RequestFailedError)."""
    text = f"{reason}: {message}" if reason and message else (reason or message or "failed")
    category = "user" if code in {int(c) for c in USER_CODES} else "server"
    return {"error": text, "category": category}
