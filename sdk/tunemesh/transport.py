"""The gRPC channel, the public stubs and authenticated, retried unary calls.

The channel is a grpc.aio channel on the ServiceClient's one event loop (`LoopThread`):
calls are coroutines there (`call_async`), and `call` runs one from a sync caller. A
caller-supplied synchronous grpc.Channel works too: its calls go through grpc's own
futures, bridged onto the loop, so no thread waits on them either.

`Transport.connect` opens the channel over TLS when given channel credentials
(`channel_credentials` makes them from a CA bundle, or from the system roots), else in
plaintext (a mesh run with --insecure).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pathlib
import socket
from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from tunemesh.errors import request_too_large
from tunemesh.loop import LoopThread
from tunemesh.retry import RetryPolicy, call_with_retry_async
from tunemesh.v1 import (
    checkpoints_pb2_grpc, operations_pb2_grpc, sampling_pb2_grpc, sessions_pb2_grpc, training_pb2_grpc,
)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""The channel's send and receive limits, and the services' receive limit (same value)."""


def channel_target(address: str) -> str:
    """A gRPC target for `host:port` (as is) or for `host:port,host:port,...` (the
    replicas' IPv4 addresses, resolved now, tried in order by the channel)."""
    parts = [part.strip() for part in address.split(",") if part.strip()]
    if len(parts) == 1:
        return parts[0]
    resolved: list[str] = []
    for part in parts:
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"scheduler address {part!r} is not host:port")
        infos = socket.getaddrinfo(host, int(port), family=socket.AF_INET, type=socket.SOCK_STREAM)
        resolved += [f"{info[4][0]}:{info[4][1]}" for info in infos if f"{info[4][0]}:{info[4][1]}" not in resolved]
    return "ipv4:" + ",".join(resolved)


def public_target(address: str, tls: bool) -> tuple[str, list[tuple[str, Any]]]:
    """The gRPC target of `address` (`channel_target`) and the channel options a TLS
    channel to it needs: a resolved list of replicas has no host of its own to check the
    certificates against, so every replica's certificate must name the list's first host
    (as written)."""
    target = channel_target(address)
    if not (tls and target.startswith("ipv4:")):
        return target, []
    first = next(part.strip() for part in address.split(",") if part.strip())
    return target, [("grpc.default_authority", first)]


def channel_credentials(
    ca_bundle: str | os.PathLike[str] | bytes | None, tls: bool | None, *, source: str = "",
) -> grpc.ChannelCredentials | None:
    """TLS credentials for a channel to the mesh's public endpoint, or None for plaintext.

    `ca_bundle` is a path to a PEM bundle of the CAs to trust, or the PEM bytes. `tls`:
    True = TLS (trusting `ca_bundle`, else the system roots), False = plaintext, None =
    TLS exactly when a bundle is given. `source` names where the bundle came from (e.g.
    an environment variable) for the error message. Raises ValueError for plaintext with
    a bundle and for a bundle that cannot be read or holds no PEM certificate, which
    would otherwise show only as failed handshakes, retried until the call's deadline.
    """
    if tls is False:
        if ca_bundle is not None:
            raise ValueError("a CA bundle was given with tls=False: pass one or the other")
        return None
    if ca_bundle is None:
        return grpc.ssl_channel_credentials(None) if tls else None
    return grpc.ssl_channel_credentials(_read_ca_bundle(ca_bundle, source))


def _read_ca_bundle(ca_bundle: str | os.PathLike[str] | bytes, source: str) -> bytes:
    """The PEM bytes of `ca_bundle` (a path, or PEM bytes as they are); ValueError naming
    the path (and `source`) when it cannot be read or holds no PEM certificate."""
    if isinstance(ca_bundle, bytes):
        what, pem = "the CA bundle given as bytes", ca_bundle
    else:
        what = f"the CA bundle {os.fspath(ca_bundle)}" + (f" (from {source})" if source else "")
        try:
            pem = pathlib.Path(ca_bundle).read_bytes()
        except OSError as err:
            raise ValueError(f"cannot read {what}: {err.strerror or err}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ValueError(f"{what} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return pem


class Transport:
    """Owns one channel and the loop it runs on; every call carries `authorization:
    Bearer <key>` and is retried.

    A request over `max_request_bytes` (default: the services' receive limit) fails with
    INVALID_ARGUMENT [REQUEST_TOO_LARGE] before anything is sent.
    """

    def __init__(
        self, channel: grpc.Channel | grpc.aio.Channel, api_key: str | None, policy: RetryPolicy,
        max_request_bytes: int = MAX_MESSAGE_BYTES, loop: LoopThread | None = None,
    ) -> None:
        self.loop = loop or LoopThread()
        self.channel = channel
        self.policy = policy
        self.max_request_bytes = max_request_bytes
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.is_aio = isinstance(channel, grpc.aio.Channel)
        self.sessions = sessions_pb2_grpc.SessionServiceStub(channel)
        self.training = training_pb2_grpc.TrainingServiceStub(channel)
        self.operations = operations_pb2_grpc.OperationServiceStub(channel)
        self.checkpoints = checkpoints_pb2_grpc.CheckpointServiceStub(channel)
        self.sampling = sampling_pb2_grpc.SamplingServiceStub(channel)

    @classmethod
    def connect(
        cls, address: str, api_key: str | None, policy: RetryPolicy,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> Transport:
        """Open a grpc.aio channel to `host:port`, or to a comma-separated list of
        scheduler replicas: only the leader serves, and the channel tries the addresses in
        turn until it reaches it (again after a failover), retrying within a second or two.

        With `credentials` (see `channel_credentials`) the channel is TLS and checks the
        server's certificate names the host dialled; for a list, every replica's
        certificate must name the list's first host (the host name as written, before
        the list is resolved to IPv4 addresses). Without, it is plaintext (--insecure).
        """
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.min_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        target, tls_options = public_target(address, credentials is not None)
        options += tls_options
        loop = LoopThread()

        async def open_channel() -> grpc.aio.Channel:  # bound to the loop it is made on
            if credentials is None:
                return grpc.aio.insecure_channel(target, options=options)
            return grpc.aio.secure_channel(target, credentials, options=options)

        return cls(loop.run(open_channel()), api_key, policy, loop=loop)

    async def invoke(self, method: Any, request: Any, timeout: float | None) -> Any:
        """One attempt of a unary call, on the loop; raises grpc.RpcError."""
        if self.is_aio:
            return await method(request, timeout=timeout, metadata=self.metadata)
        return await _bridge(method.future(request, timeout=timeout, metadata=self.metadata))

    async def call_async(
        self, method: Any, request: Any, *, what: str = "call", attempt_timeout_s: float = 0
    ) -> Any:
        """Invoke a unary stub method with auth metadata, retrying per the policy.

        `attempt_timeout_s` overrides the policy's per-attempt deadline (e.g. long polls).
        Raises InvalidArgumentError [REQUEST_TOO_LARGE], sending nothing, for a request
        over `max_request_bytes`.
        """
        size = request.ByteSize()
        if size > self.max_request_bytes:
            raise request_too_large(what, size, self.max_request_bytes)
        policy = self.policy
        if attempt_timeout_s:  # the whole call may then last at least one such attempt
            policy = dataclasses.replace(policy, attempt_timeout_s=attempt_timeout_s,
                                         total_timeout_s=max(policy.total_timeout_s, attempt_timeout_s))
        return await call_with_retry_async(lambda timeout: self.invoke(method, request, timeout), policy, what=what)

    def call(
        self, method: Any, request: Any, *, what: str = "call", attempt_timeout_s: float = 0
    ) -> Any:
        """`call_async` for a sync caller: runs on the loop, blocks until it returns."""
        return self.loop.run(self.call_async(method, request, what=what, attempt_timeout_s=attempt_timeout_s))

    def stream(self, method: Any, request: Any) -> Iterator[Any]:
        """The responses of a server-streaming call, for a sync caller; not retried.
        Raises grpc.RpcError; closing the iterator cancels the call."""
        if not self.is_aio:
            call = method(request, metadata=self.metadata)
            try:
                yield from call
            finally:
                call.cancel()
            return

        async def start() -> Any:
            return method(request, metadata=self.metadata)

        call = self.loop.run(start())
        try:
            while (response := self.loop.run(call.read())) is not grpc.aio.EOF:
                yield response
        finally:
            self.loop.call_soon(call.cancel)

    def upload(self, method: Any, requests: Iterable[Any]) -> Any:
        """A client-streaming call fed from `requests`, for a sync caller; not retried.
        Raises grpc.RpcError."""
        if not self.is_aio:
            return method(iter(requests), metadata=self.metadata)

        async def send() -> Any:
            return await method(iter(requests), metadata=self.metadata)

        return self.loop.run(send())

    def close(self) -> None:
        """Close the channel and stop the loop."""
        if self.is_aio:
            try:
                self.loop.run(self.channel.close(), timeout=5.0)
            except RuntimeError:
                pass  # closed from the loop itself: the loop's end drops the channel
        else:
            self.channel.close()
        self.loop.close()


async def _bridge(call: grpc.Future) -> Any:
    """Await a sync channel's grpc.Future on the running loop (grpc resolves it on its
    own thread); cancelling the await cancels the call."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def settle(finished: grpc.Future) -> None:
        if done.done():
            return
        try:
            done.set_result(finished.result())
        except grpc.RpcError as err:
            done.set_exception(err)
        except grpc.FutureCancelledError:
            done.cancel()

    def hand_over(finished: grpc.Future) -> None:  # on grpc's thread
        try:
            loop.call_soon_threadsafe(settle, finished)
        except RuntimeError:
            pass  # the loop is closed: nobody awaits this call any more

    call.add_done_callback(hand_over)
    try:
        return await done
    except asyncio.CancelledError:
        call.cancel()
        raise
