"""The gRPC channel, the public stubs and authenticated, retried unary calls."""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

import grpc

from tunemesh.errors import request_too_large
from tunemesh.retry import RetryPolicy, call_with_retry
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


class Transport:
    """Owns one channel; every call carries `authorization: Bearer <key>` and is retried.

    A request over `max_request_bytes` (default: the services' receive limit) fails with
    INVALID_ARGUMENT [REQUEST_TOO_LARGE] before anything is sent.
    """

    def __init__(
        self, channel: grpc.Channel, api_key: str | None, policy: RetryPolicy,
        max_request_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.channel = channel
        self.policy = policy
        self.max_request_bytes = max_request_bytes
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.sessions = sessions_pb2_grpc.SessionServiceStub(channel)
        self.training = training_pb2_grpc.TrainingServiceStub(channel)
        self.operations = operations_pb2_grpc.OperationServiceStub(channel)
        self.checkpoints = checkpoints_pb2_grpc.CheckpointServiceStub(channel)
        self.sampling = sampling_pb2_grpc.SamplingServiceStub(channel)

    @classmethod
    def connect(cls, address: str, api_key: str | None, policy: RetryPolicy) -> Transport:
        """Open an insecure channel (TLS termination is the deployment's concern) to
        `host:port`, or to a comma-separated list of scheduler replicas: only the leader
        serves, and the channel tries the addresses in turn until it reaches it (again
        after a failover), retrying within a second or two."""
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.min_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        return cls(grpc.insecure_channel(channel_target(address), options=options), api_key, policy)

    def call(
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
        return call_with_retry(
            lambda timeout: method(request, timeout=timeout, metadata=self.metadata),
            policy,
            what=what,
        )

    def close(self) -> None:
        self.channel.close()
