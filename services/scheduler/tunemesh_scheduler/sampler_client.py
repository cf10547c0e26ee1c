"""Calls into sampler nodes over the internal gRPC SamplerService."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc

from tunemesh_internal.v1 import sampler_pb2, sampler_pb2_grpc
from tunemesh.errors import UnavailableError
from tunemesh_common.service.rpc import LEADER_TOKEN_KEY, PeerChannels, error_from_peer
from tunemesh_common.security.tls import MeshTls, identity_name
from tunemesh_scheduler.core.sampling import SamplingSessionRecord
from tunemesh_scheduler.nodes import SamplerDirectory

log = logging.getLogger(__name__)


class GrpcSamplerPort:
    """One channel per sampler node; `address_of` maps node ids to `host:port`."""

    def __init__(self, address_of: Callable[[str], str], timeout_s: float, tls: MeshTls | None = None) -> None:
        self._channels = PeerChannels(sampler_pb2_grpc.SamplerServiceStub, address_of, tls,
                                      lambda node_id: identity_name("sampler", node_id))
        self._timeout_s = timeout_s
        self.leader_token = 0  # sent on every call: samplers refuse a lower one than they saw

    async def _call(self, node_id: str, rpc: Callable, request):
        """`rpc(request)` (a method of the node's stub) with the leader token; errors typed."""
        try:
            return await rpc(request, timeout=self._timeout_s, metadata=((LEADER_TOKEN_KEY, str(self.leader_token)),))
        except grpc.aio.AioRpcError as err:
            raise error_from_peer(err, f"sampler {node_id}") from None

    async def sample(self, node_id: str, request: sampler_pb2.SampleRequest) -> sampler_pb2.SampleResponse:
        return await self._call(node_id, self._channels.stub(node_id).Sample, request)

    async def compute_logprobs(self, node_id: str, request: sampler_pb2.ComputeLogprobsRequest):
        return await self._call(node_id, self._channels.stub(node_id).ComputeLogprobs, request)

    async def close(self) -> None:
        await self._channels.close()


class SamplerRouter:
    """Sends a sampling session's requests to its sampler; when that node is gone (or
    answers UNAVAILABLE), routes the session to another sampler once and retries."""

    def __init__(self, directory: SamplerDirectory, port: GrpcSamplerPort) -> None:
        self.directory, self._port = directory, port

    @property
    def leader_token(self) -> int:
        return self._port.leader_token

    @leader_token.setter
    def leader_token(self, token: int) -> None:
        self._port.leader_token = token

    async def sample(self, record: SamplingSessionRecord, request: sampler_pb2.SampleRequest):
        return await self._routed(record, lambda node: self._port.sample(node, request))

    async def compute_logprobs(self, record: SamplingSessionRecord, request: sampler_pb2.ComputeLogprobsRequest):
        return await self._routed(record, lambda node: self._port.compute_logprobs(node, request))

    async def _routed(self, record: SamplingSessionRecord, call: Callable[[str], Awaitable]):
        """`call(node)` on the session's sampler; when that node is gone (or answers
        UNAVAILABLE), once more on another sampler serving the model."""
        if record.node_id not in self.directory.nodes():
            record.node_id = self.directory.route(record.base_model, record.adapter_key)
        try:
            return await self._counted(record.node_id, call)
        except UnavailableError:
            others = [n for n in self.directory.serving(record.base_model) if n != record.node_id]
            if not others:
                raise
            log.warning("sampler %s unavailable; %s moves", record.node_id, record.name)
            record.node_id = self.directory.route(record.base_model, record.adapter_key, exclude=record.node_id)
            return await self._counted(record.node_id, call)

    async def close(self) -> None:
        await self._port.close()

    async def _counted(self, node_id: str, call: Callable[[str], Awaitable]):
        self.directory.in_flight[node_id] += 1
        try:
            return await call(node_id)
        finally:
            self.directory.in_flight[node_id] -= 1
