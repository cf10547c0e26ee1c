"""gRPC server plumbing shared by every service.

One interceptor maps typed errors to a rich status (`tunemesh.errors.to_status`: the
reason in a `google.rpc.ErrorInfo`) and, where a service asks for it, authenticates the
caller into a tenant; an outer one counts and times every call by its final status.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import inspect
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import grpc

from tunemesh.errors import (
    FailedPreconditionError,
    InternalError,
    ResourceExhaustedError,
    TunemeshError,
    UnauthenticatedError,
    UnavailableError,
    error_from_rpc,
    to_status,
)
from tunemesh_common.service.metrics import RpcMetrics
from tunemesh_common.security.tls import MeshTls, PeerPolicy, open_channel

log = logging.getLogger(__name__)

LEADER_TOKEN_KEY = "tunemesh-leader-token"  # the calling scheduler's fencing token (internal calls)
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Peers ping every KEEPALIVE_MS (also between calls): accept it instead of GOAWAY.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 4_000),
    ("grpc.http2.max_ping_strikes", 0),
]
KEEPALIVE_MS = 5_000
# Internal channels ping their peer: a paused or partitioned peer fails the calls out to
# it within KEEPALIVE_MS + its timeout, not at the call's deadline (up to 10 minutes).
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_http_proxy", 0),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A peer that died comes back (restarted, often on the same address) within seconds:
    # try to reconnect at least every second, not after gRPC's default backoff (up to
    # 2 minutes), during which every call fails at once with "failed to connect".
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant")
# (call metadata, caller's peer address) -> tenant, or an awaitable of it; raises
# UnauthenticatedError (or another typed error) to refuse the call.
Authenticator = Callable[[Mapping[str, str], str], str | Awaitable[str]]


def current_tenant() -> str:
    """The tenant the running RPC was authenticated as."""
    return _tenant.get()


@dataclasses.dataclass(frozen=True)
class MessageLimits:
    """The largest request message (bytes) each RPC with a unary request takes, by method
    path; `default` for the others (0: only the server's own limit). A message over its
    limit is refused from its length, before it is decoded: RESOURCE_EXHAUSTED
    [REQUEST_TOO_LARGE], naming the limit (final: the SDK does not retry it)."""

    by_method: Mapping[str, int] = dataclasses.field(default_factory=dict)
    default: int = 0

    def of(self, method: str) -> int:
        return self.by_method.get(method, self.default)


@dataclasses.dataclass(frozen=True)
class _Oversized:
    """What a request over its limit decodes to: its size, and nothing of its content."""

    size: int
    limit: int


def _limited(deserializer: Callable[[bytes], object], limit: int) -> Callable[[bytes], object]:
    def deserialize(raw: bytes) -> object:
        return _Oversized(len(raw), limit) if len(raw) > limit else deserializer(raw)

    return deserialize


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps TunemeshError to its status; unexpected errors to INTERNAL without a traceback.

    Every RPC except health and reflection first passes the `peer_policy` (a mutual-TLS
    server: the caller's certificate must prove an allowed mesh role, else
    PERMISSION_DENIED), then, with an `authenticator`, resolves the caller's tenant
    (UNAUTHENTICATED otherwise) into `current_tenant()`; then a request over its
    `limits` is refused (RESOURCE_EXHAUSTED [REQUEST_TOO_LARGE]) without being decoded.
    """

    def __init__(self, authenticator: Authenticator | None = None, peer_policy: PeerPolicy | None = None,
                 limits: MessageLimits | None = None) -> None:
        self._authenticator = authenticator
        self._peer_policy = peer_policy
        self._limits = limits

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return _rewrap(handler, lambda inner: self._guard_unary(inner, method, False), None)
        limit = self._limits.of(method) if self._limits is not None else 0
        deserializer = handler.request_deserializer
        if limit and deserializer is not None and (handler.unary_unary or handler.unary_stream):
            deserializer = _limited(deserializer, limit)
        return _rewrap(handler, lambda inner: self._guard_unary(inner, method, True),
                       lambda inner: self._guard_stream(inner, method, True), deserializer)

    async def _admit(self, request, context: grpc.aio.ServicerContext, method: str) -> None:
        """The caller's role checked, then its tenant resolved (each where configured), then
        the request's size."""
        if self._peer_policy is not None:
            self._peer_policy.check(context, method)
        if self._authenticator is not None:
            metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
            tenant = self._authenticator(metadata, context.peer() or "")
            _tenant.set(await tenant if inspect.isawaitable(tenant) else tenant)
        if isinstance(request, _Oversized):
            raise ResourceExhaustedError(
                "REQUEST_TOO_LARGE", f"{method.rsplit('/', 1)[-1]} takes requests of at most {request.limit} bytes; "
                f"this one has {request.size}")

    def _guard_unary(self, inner, method: str, admit: bool):
        """A unary-response handler (request or request stream in) with errors mapped."""

        async def guarded(request, context: grpc.aio.ServicerContext):
            async with _errors_mapped(context, method):
                if admit:
                    await self._admit(request, context, method)
                return await inner(request, context)

        return guarded

    def _guard_stream(self, inner, method: str, admit: bool):
        """A response-streaming handler with errors mapped (also mid-stream)."""

        async def guarded(request, context: grpc.aio.ServicerContext):
            async with _errors_mapped(context, method):
                if admit:
                    await self._admit(request, context, method)
                async for response in inner(request, context):
                    yield response

        return guarded


@contextlib.asynccontextmanager
async def _errors_mapped(context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[None]:
    """A tunemesh error ends the call with its rich status; anything unexpected is logged
    and ends it INTERNAL, naming the method and nothing of the exception."""
    try:
        yield
    except TunemeshError as err:
        await _abort(context, err)
    except grpc.aio.AbortError:
        raise
    except Exception:
        log.exception("unexpected error in %s", method)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")


def _rewrap(handler: grpc.RpcMethodHandler, unary: Callable, stream: Callable | None,
            request_deserializer: Callable | None = None) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour wrapped: `unary(behaviour)` for a unary response (request
    or request stream in), `stream(behaviour)` for a response stream (unchanged when None),
    and its request decoder replaced when `request_deserializer` is given. Bidirectional
    streams are left as they are."""
    codecs = dict(request_deserializer=request_deserializer or handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **codecs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **codecs)
    if handler.unary_stream is not None and stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **codecs)
    return handler


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call by method and final status. It sits outside
    `ErrorInterceptor`, so a typed error counts under the status it became. Health
    `Watch` and reflection streams are not counted (they last as long as their client)."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        return _rewrap(handler, lambda inner: self._time_unary(inner, method),
                       None if method.startswith("/grpc.") else lambda inner: self._time_stream(inner, method))

    def _time_unary(self, inner, method: str):
        async def timed(request, context: grpc.aio.ServicerContext):
            call = self._metrics.start(method)
            try:
                response = await inner(request, context)
            except BaseException as exc:
                call.finish(final_status(context, exc))
                raise
            call.finish(final_status(context))
            return response

        return timed

    def _time_stream(self, inner, method: str):
        async def timed(request, context: grpc.aio.ServicerContext):
            call = self._metrics.start(method)
            try:
                async for response in inner(request, context):
                    yield response
            except BaseException as exc:
                call.finish(final_status(context, exc))
                raise
            call.finish(final_status(context))

        return timed


def final_status(context: grpc.aio.ServicerContext, exc: BaseException | None = None) -> str:
    """The status name a call ends with: the code set on `context` (an abort sets it);
    CANCELLED or DEADLINE_EXCEEDED when the call was cancelled; else OK, or UNKNOWN when
    an exception escaped (what grpc answers then)."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return _STATUS_BY_VALUE[code].name
    return "OK" if exc is None else "UNKNOWN"


async def _abort(context: grpc.aio.ServicerContext, err: TunemeshError) -> None:
    status = to_status(err)
    await context.abort(status.code, status.details, status.trailing_metadata)


_STATUS_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}


TENANT_KEY = "tunemesh-tenant"


def trusted_tenant(metadata: Mapping[str, str], peer: str = "") -> str:
    """Authenticator of internal services: the calling mesh service names the tenant in
    `tunemesh-tenant` (the scheduler has authenticated it). A service that uses this
    admits mesh identities only (mutual TLS and a `PeerPolicy`; with --insecure, only
    network policy keeps others out)."""
    tenant = metadata.get(TENANT_KEY, "")
    if not tenant:
        raise UnauthenticatedError("MISSING_TENANT", f"internal call without `{TENANT_KEY}` metadata")
    return tenant


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_CONTEXT = ("tenant", "run", "operation", "node")  # `extra=` keys a log line carries at its end


class ContextFormatter(logging.Formatter):
    """The standard line, then the context its record carries (`extra={"run": ...}`, and
    the tenant of the RPC being served): `... message [tenant=t1 run=runs/abc]`."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{key}={value}" for key in LOG_CONTEXT if (value := getattr(record, key, None)))
        return f"{line} [{context}]" if context else line


class _TenantOfTheCall(logging.Filter):
    """Tags a record with the tenant whose RPC is being served, when it names none."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "tenant", None) is None and (tenant := _tenant.get(None)):
            record.tenant = tenant
        return True


class _ThisNode(logging.Filter):
    """Tags every record with the node this process serves as, when it names none."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self._node = node

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "node", None) is None:
            record.node = self._node
        return True


def configure_logging(node: str = "") -> None:
    """INFO (or `TUNEMESH_LOG_LEVEL`, e.g. DEBUG) to stderr, each line ending in its context
    (tenant, run, operation, node); `node`: the node id of a trainer or sampler process,
    put on every line."""
    handler = logging.StreamHandler()
    handler.setFormatter(ContextFormatter(LOG_FORMAT))
    handler.addFilter(_TenantOfTheCall())
    if node:
        handler.addFilter(_ThisNode(node))
    level = os.environ.get("TUNEMESH_LOG_LEVEL", "INFO").upper()
    if not isinstance(logging.getLevelName(level), int):
        raise SystemExit(f"TUNEMESH_LOG_LEVEL={level!r} is not a log level (DEBUG, INFO, WARNING, ERROR)")
    logging.basicConfig(level=level, handlers=[handler])


class LeaderFence:
    """A node's side of leader fencing: the highest scheduler token seen; a call with a
    lower one comes from a deposed leader and is refused (no token: unfenced)."""

    def __init__(self) -> None:
        self.highest = 0

    def check(self, context) -> None:
        raw = dict(context.invocation_metadata() or ()).get(LEADER_TOKEN_KEY, "")
        token = int(raw) if raw.isdigit() else 0
        if token and token < self.highest:
            raise FailedPreconditionError(
                "STALE_LEADER", f"a scheduler with a newer leadership ({self.highest}) took over; token {token} refused"
            )
        self.highest = max(self.highest, token)


def error_from_peer(err: grpc.RpcError, peer: str, *, failure_reason: str = "PEER_ERROR") -> TunemeshError:
    """A status from another mesh service as a typed error (decoded by
    `tunemesh.errors.error_from_rpc`). Without a tunemesh reason the call failed outside
    the peer's code: transport failures become UNAVAILABLE [PEER_UNAVAILABLE] (retry),
    anything else (a crash) INTERNAL [`failure_reason`]; both name the peer."""
    error = error_from_rpc(err)
    if error.reason:
        return error
    what = f"{peer}: {error.code.name}: {error.message}"
    if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return UnavailableError("PEER_UNAVAILABLE", what)
    return InternalError(failure_reason, what)


class PeerChannels:
    """One channel (and stub) per peer node, made again when the node's address changes.
    With `tls`, a channel accepts only the server proving the node's identity
    (`identity_of(node_id)`, e.g. `t1.trainer.tunemesh`): a record in etcd that points
    at another process's address gets no call."""

    def __init__(self, stub_class: type, address_of: Callable[[str], str],
                 tls: MeshTls | None = None, identity_of: Callable[[str], str] = str) -> None:
        self._stub_class, self._address_of = stub_class, address_of
        self._tls, self._identity_of = tls, identity_of
        self._channels: dict[str, tuple[str, grpc.aio.Channel, object]] = {}

    def stub(self, node_id: str):
        address = self._address_of(node_id)
        cached = self._channels.get(node_id)
        if cached is None or cached[0] != address:
            if cached is not None:
                asyncio.ensure_future(cached[1].close())
            channel = open_channel(address, self._tls, self._identity_of(node_id), CHANNEL_OPTIONS)
            cached = self._channels[node_id] = (address, channel, self._stub_class(channel))
        return cached[2]

    async def close(self) -> None:
        for _, channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()
