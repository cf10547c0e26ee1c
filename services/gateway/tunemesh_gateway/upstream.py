"""The gateway's one channel to the scheduler's public port: every call carries the
Tinker caller's key as `authorization: Bearer <key>` (the scheduler authenticates it and
finds the tenant), and a failed call raises the typed TunemeshError of its rich status.

TLS checks the scheduler's certificate against `ca_bundle` (the mesh CA), else the
system roots; plaintext only with `insecure`. A comma-separated list of scheduler
replicas is resolved to their IPv4 addresses, tried in order (only the leader serves);
each replica's certificate must then name the list's first host.
"""

from __future__ import annotations

import pathlib
import socket
from typing import Any

import grpc

from tunemesh.errors import error_from_rpc
from tunemesh.v1 import (
    checkpoints_pb2_grpc, operations_pb2_grpc, sampling_pb2_grpc, sessions_pb2_grpc, training_pb2_grpc,
)

from tunemesh_gateway.core.ports import Caller

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # the services' receive limit


def credentials(ca_bundle: pathlib.Path | None, insecure: bool) -> grpc.ChannelCredentials | None:
    """Channel credentials for the scheduler, None for plaintext; ValueError for a bundle
    that cannot be read or holds no certificate (else only failed handshakes would show it)."""
    if insecure:
        if ca_bundle is not None:
            raise ValueError("--insecure true and --ca-bundle: choose one")
        return None
    if ca_bundle is None:
        return grpc.ssl_channel_credentials()
    try:
        pem = pathlib.Path(ca_bundle).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read the CA bundle {ca_bundle}: {err.strerror or err}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ValueError(f"the CA bundle {ca_bundle} holds no PEM certificate")
    return grpc.ssl_channel_credentials(pem)


def target(address: str, tls: bool) -> tuple[str, list[tuple[str, Any]]]:
    """The gRPC target of `host:port` or of a replica list, and the options it needs."""
    parts = [part.strip() for part in address.split(",") if part.strip()]
    if len(parts) == 1:
        return parts[0], []
    resolved: list[str] = []
    for part in parts:
        host, _, port = part.rpartition(":")
        for info in socket.getaddrinfo(host, int(port), family=socket.AF_INET, type=socket.SOCK_STREAM):
            if (text := f"{info[4][0]}:{info[4][1]}") not in resolved:
                resolved.append(text)
    return "ipv4:" + ",".join(resolved), [("grpc.default_authority", parts[0])] if tls else []


class GrpcUpstream:
    """`core.Upstream` over a grpc.aio channel (made on the serving event loop)."""

    def __init__(self, address: str, creds: grpc.ChannelCredentials | None) -> None:
        where, extra = target(address, creds is not None)
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", 500), ("grpc.min_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 2000), *extra,
        ]
        self.channel = (grpc.aio.insecure_channel(where, options=options) if creds is None
                        else grpc.aio.secure_channel(where, creds, options=options))
        self.sessions = sessions_pb2_grpc.SessionServiceStub(self.channel)
        self.training = training_pb2_grpc.TrainingServiceStub(self.channel)
        self.operations = operations_pb2_grpc.OperationServiceStub(self.channel)
        self.checkpoints = checkpoints_pb2_grpc.CheckpointServiceStub(self.channel)
        self.sampling = sampling_pb2_grpc.SamplingServiceStub(self.channel)

    async def call(self, caller: Caller, method: Any, request: Any, timeout: float | None = None) -> Any:
        """One attempt, as `caller` (the SDK retries what the HTTP status says to retry)."""
        try:
            return await method(request, timeout=timeout, metadata=(("authorization", f"Bearer {caller.api_key}"),))
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    async def close(self) -> None:
        await self.channel.close()
