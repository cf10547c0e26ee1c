"""The checkpoint service as seen from the scheduler: the public CheckpointService is
forwarded there with the caller's tenant named in `tunemesh-tenant` metadata."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc

from tunemesh.v1 import checkpoints_pb2, checkpoints_pb2_grpc
from tunemesh.errors import FailedPreconditionError
from tunemesh_common.checkpoints.uploads import send_upload
from tunemesh_common.checkpoints.client import CHECKPOINT_IDENTITY
from tunemesh_common.service.rpc import CHANNEL_OPTIONS, TENANT_KEY, error_from_peer
from tunemesh_common.security.tls import MeshTls, open_channel


class CheckpointProxy:
    """One channel to the checkpoint process; every call is scoped to a tenant."""

    def __init__(self, address: str, timeout_s: float = 600.0, tls: MeshTls | None = None) -> None:
        self.address = address
        self._timeout_s = timeout_s
        self._channel = open_channel(address, tls, CHECKPOINT_IDENTITY, CHANNEL_OPTIONS) if address else None
        self._stub = checkpoints_pb2_grpc.CheckpointServiceStub(self._channel) if address else None

    @property
    def stub(self) -> checkpoints_pb2_grpc.CheckpointServiceStub:
        if self._stub is None:
            raise FailedPreconditionError("NO_CHECKPOINT_SERVICE", "this mesh runs without a checkpoint service")
        return self._stub

    async def _call(self, rpc: Callable, request, tenant: str):
        """A unary CheckpointService call (`rpc`, a method of the stub) for `tenant`;
        errors come back typed."""
        try:
            return await rpc(request, timeout=self._timeout_s, metadata=_tenant(tenant))
        except grpc.aio.AioRpcError as err:
            raise error_from_peer(err, "checkpoint service") from None

    async def list(self, request: checkpoints_pb2.ListCheckpointsRequest, tenant: str):
        return await self._call(self.stub.ListCheckpoints, request, tenant)

    async def get_checkpoint(self, request: checkpoints_pb2.GetCheckpointRequest, tenant: str):
        return await self._call(self.stub.GetCheckpoint, request, tenant)

    async def delete(self, request: checkpoints_pb2.DeleteCheckpointRequest, tenant: str):
        return await self._call(self.stub.DeleteCheckpoint, request, tenant)

    async def update_ttl(self, request: checkpoints_pb2.UpdateCheckpointTtlRequest, tenant: str):
        return await self._call(self.stub.UpdateCheckpointTtl, request, tenant)

    async def get(self, tenant: str, path: str) -> checkpoints_pb2.Checkpoint:
        request = checkpoints_pb2.GetCheckpointRequest(path=path)
        return (await self.get_checkpoint(request, tenant)).checkpoint

    async def download(self, request, tenant: str) -> AsyncIterator[checkpoints_pb2.DownloadCheckpointResponse]:
        try:
            async for response in self.stub.DownloadCheckpoint(request, timeout=self._timeout_s, metadata=_tenant(tenant)):
                yield response
        except grpc.aio.AioRpcError as err:
            raise error_from_peer(err, "checkpoint service") from None

    async def import_(self, requests: AsyncIterator, tenant: str) -> checkpoints_pb2.ImportCheckpointResponse:
        """Forward an upload one message at a time (never buffered here); a refusal of the
        checkpoint service comes back typed, also while the caller is still sending."""
        call = self.stub.ImportCheckpoint(timeout=self._timeout_s, metadata=_tenant(tenant))
        try:
            return await send_upload(call, requests)
        except grpc.aio.AioRpcError as err:
            raise error_from_peer(err, "checkpoint service") from None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


def _tenant(tenant: str) -> tuple[tuple[str, str], ...]:
    return ((TENANT_KEY, tenant),)
