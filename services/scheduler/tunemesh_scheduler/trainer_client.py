"""TrainerPort over the internal gRPC TrainerService: one channel per trainer node."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import grpc

from tunemesh_internal.v1 import trainer_pb2, trainer_pb2_grpc
from tunemesh.v1 import checkpoints_pb2
from tunemesh.errors import NotFoundError, TunemeshError, UnavailableError
from tunemesh_common.service.rpc import LEADER_TOKEN_KEY, PeerChannels, error_from_peer
from tunemesh_common.security.tls import MeshTls, identity_name
from tunemesh_scheduler.core.ports import BatchItem, Fence, ItemOutcome
from tunemesh_scheduler.core.work import DataWork, LoadRequest, SaveRequest, StepWork
from tunemesh_scheduler.core.records import OperationError, OpKind

log = logging.getLogger(__name__)

_ITEM_KINDS = {
    OpKind.FORWARD: trainer_pb2.ITEM_KIND_FORWARD,
    OpKind.FORWARD_BACKWARD: trainer_pb2.ITEM_KIND_FORWARD_BACKWARD,
    OpKind.OPTIM_STEP: trainer_pb2.ITEM_KIND_OPTIM_STEP,
}


def _translate(err: grpc.aio.AioRpcError, node_id: str) -> TunemeshError:
    """A trainer's status as a typed error. Any UNAVAILABLE or DEADLINE_EXCEEDED (the
    trainer's own too) is UNAVAILABLE [TRAINER_UNAVAILABLE]: the call is in doubt."""
    if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return UnavailableError("TRAINER_UNAVAILABLE", f"trainer {node_id}: {err.code().name}: {err.details()}")
    return error_from_peer(err, f"trainer {node_id}", failure_reason="TRAINER_ERROR")


class GrpcTrainerPort:
    """Implements core.ports.TrainerPort; `address_of` maps node ids to `host:port`."""

    def __init__(self, address_of: Callable[[str], str], timeout_s: float, checkpoints=None,
                 tls: MeshTls | None = None) -> None:
        self._channels = PeerChannels(trainer_pb2_grpc.TrainerServiceStub, address_of, tls,
                                      lambda node_id: identity_name("trainer", node_id))
        self._timeout_s = timeout_s
        self._checkpoints = checkpoints  # CheckpointProxy: finds and deletes snapshots
        self.leader_token = 0  # sent on every call: trainers refuse a lower one than they saw
        self.on_unavailable: Callable[[str], None] | None = None  # told the node of each UNAVAILABLE call

    def stub(self, node_id: str) -> trainer_pb2_grpc.TrainerServiceStub:
        return self._channels.stub(node_id)

    async def _call(self, node_id: str, rpc: Callable, request):
        """`rpc(request)` (a method of the node's stub) with the leader token; errors typed."""
        try:
            return await rpc(
                request, timeout=self._timeout_s, metadata=((LEADER_TOKEN_KEY, str(self.leader_token)),)
            )
        except grpc.aio.AioRpcError as err:
            if err.code() is grpc.StatusCode.UNAVAILABLE and self.on_unavailable is not None:
                self.on_unavailable(node_id)
            raise _translate(err, node_id) from None

    async def create_adapter(self, node_id: str, run_name: str, base_model: str, lora, epoch: int = 0) -> None:
        request = trainer_pb2.CreateAdapterRequest(
            adapter_id=run_name, base_model=base_model, lora_config=lora, epoch=epoch
        )
        await self._call(node_id, self.stub(node_id).CreateAdapter, request)

    async def restore_adapter(self, node_id: str, run_name: str, base_model: str, lora, epoch: int,
                              tenant: str, start: LoadRequest | None) -> int:
        request = trainer_pb2.RestoreAdapterRequest(
            adapter_id=run_name, base_model=base_model, lora_config=lora, epoch=epoch, tenant=tenant,
            path=start.path if start else "", load_optimizer_state=bool(start and start.load_optimizer_state),
        )
        return (await self._call(node_id, self.stub(node_id).RestoreAdapter, request)).step

    async def adopt_adapter(self, node_id: str, run_name: str, epoch: int) -> int:
        request = trainer_pb2.AdoptAdapterRequest(adapter_id=run_name, epoch=epoch)
        return (await self._call(node_id, self.stub(node_id).AdoptAdapter, request)).applied_seq_id

    async def await_snapshot(self, node_id: str, run_name: str, seq_id: int) -> None:
        request = trainer_pb2.AwaitSnapshotRequest(adapter_id=run_name, seq_id=seq_id)
        await self._call(node_id, self.stub(node_id).AwaitSnapshot, request)

    async def delete_checkpoint(self, tenant: str, path: str) -> None:
        if self._checkpoints is not None:
            await self._checkpoints.delete(checkpoints_pb2.DeleteCheckpointRequest(path=path), tenant)

    async def checkpoint_exists(self, tenant: str, path: str) -> bool:
        if self._checkpoints is None:
            return False
        try:
            await self._checkpoints.get(tenant, path)
        except NotFoundError:
            return False
        return True

    async def list_adapters(self, node_id: str) -> list[str]:
        response = await self._call(node_id, self.stub(node_id).ListAdapters, trainer_pb2.ListAdaptersRequest())
        return [a.adapter_id for a in response.adapters]

    async def delete_adapter(self, node_id: str, run_name: str) -> None:
        await self._call(node_id, self.stub(node_id).DeleteAdapter, trainer_pb2.DeleteAdapterRequest(adapter_id=run_name))

    async def save_adapter(self, node_id: str, run_name: str, tenant: str, request: SaveRequest,
                           fence: Fence = Fence()):
        response = await self._call(node_id, self.stub(node_id).SaveAdapter, trainer_pb2.SaveAdapterRequest(
            adapter_id=run_name, tenant=tenant, path=request.path,
            include_optimizer_state=request.include_optimizer_state, ttl_seconds=request.ttl_seconds,
            user_metadata=dict(request.user_metadata), seq_id=fence.seq_id, epoch=fence.epoch,
        ))
        return response.checkpoint

    async def load_adapter(self, node_id: str, run_name: str, tenant: str, request: LoadRequest,
                           fence: Fence = Fence()) -> int:
        response = await self._call(node_id, self.stub(node_id).LoadAdapter, trainer_pb2.LoadAdapterRequest(
            adapter_id=run_name, tenant=tenant, path=request.path, load_optimizer_state=request.load_optimizer_state,
            seq_id=fence.seq_id, epoch=fence.epoch,
        ))
        return response.step

    async def run_batch(self, node_id: str, items: Sequence[BatchItem]) -> list[ItemOutcome]:
        request = trainer_pb2.RunBatchRequest(items=[_batch_item(item) for item in items])
        response = await self._call(node_id, self.stub(node_id).RunBatch, request)
        return [_outcome(result) for result in response.results]

    async def tokenizer_files(self, node_id: str) -> trainer_pb2.GetTokenizerResponse:
        return await self._call(node_id, self.stub(node_id).GetTokenizer, trainer_pb2.GetTokenizerRequest())

    async def close(self) -> None:
        await self._channels.close()


def _batch_item(item: BatchItem) -> trainer_pb2.BatchItem:
    fields = dict(item_id=item.op_name, adapter_id=item.run_name, kind=_ITEM_KINDS[item.kind],
                  seq_id=item.fence.seq_id, epoch=item.fence.epoch)
    match item.payload:
        case StepWork(adam=adam):
            snapshot = None if item.snapshot is None else trainer_pb2.SnapshotTarget(
                path=item.snapshot.path, tenant=item.snapshot.tenant)
            return trainer_pb2.BatchItem(**fields, adam_params=adam, snapshot=snapshot)
        case DataWork() as work:
            return trainer_pb2.BatchItem(**fields, data=work.data, loss_fn=work.loss_fn,
                                         loss_fn_config=work.loss_fn_config)
    raise TypeError(f"{item.op_name}: {type(item.payload).__name__} is not batch work")


def _outcome(result: trainer_pb2.BatchItemResult) -> ItemOutcome:
    kind = result.WhichOneof("outcome")
    if kind == "error":
        e = result.error
        return ItemOutcome(error=OperationError(e.code, e.reason, e.message))
    return ItemOutcome(result=result.optim_step if kind == "optim_step" else result.result)
