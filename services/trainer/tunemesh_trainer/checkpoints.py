"""Save and load adapters through the checkpoint service (server layer: protos in and out).

A save snapshots the adapter on the engine thread between batches, encodes it in a worker
thread and streams it (or hands its files over, on the service's host) while other runs
keep training; a load fetches and checks the
checkpoint first and touches the adapter only once everything fits.
"""

from __future__ import annotations

import asyncio

from tunemesh_internal.v1 import checkpoint_pb2, trainer_pb2
from tunemesh.v1 import checkpoints_pb2
from tunemesh_common.checkpoints.client import CheckpointStorageClient
from tunemesh.errors import FailedPreconditionError
from tunemesh_trainer import checkpoint_files, convert
from tunemesh_trainer.core import TrainerCore
from tunemesh_trainer.domain import AdapterState


class CheckpointBridge:
    """The trainer's side of SaveAdapter / LoadAdapter."""

    def __init__(self, core: TrainerCore, storage: CheckpointStorageClient) -> None:
        self._core = core
        self._storage = storage

    async def save(self, request: trainer_pb2.SaveAdapterRequest) -> checkpoints_pb2.Checkpoint:
        state = await self._core.export_adapter(request.adapter_id, request.include_optimizer_state)
        return await self.write(state, request.tenant, request.path, request.include_optimizer_state,
                                request.ttl_seconds, request.user_metadata)

    async def write(self, state: AdapterState, tenant: str, path: str, with_optimizer: bool,
                    ttl_seconds: int = 0, user_metadata=None) -> checkpoints_pb2.Checkpoint:
        """Encode an exported adapter (in a worker thread) and stream it as a new checkpoint."""
        files = await asyncio.to_thread(checkpoint_files.encode, state, self._core.info.name)
        header = checkpoint_pb2.WriteCheckpointHeader(
            path=path,
            base_model=self._core.info.name,
            lora_config=convert.lora_config(state.spec),
            step=state.steps,
            has_optimizer_state=with_optimizer,
            ttl_seconds=ttl_seconds,
            user_metadata=user_metadata or {},
        )
        return await self._storage.write(tenant, header, files)

    async def load(self, request: trainer_pb2.LoadAdapterRequest) -> int:
        state = await self.read(request.tenant, request.path, request.load_optimizer_state)
        return await self._core.import_adapter(request.adapter_id, state)

    async def read(self, tenant: str, path: str, with_optimizer: bool) -> AdapterState:
        """A checkpoint of this node's base model, fetched, checked and decoded."""
        checkpoint, files = await self._storage.read(tenant, path)
        if checkpoint.base_model != self._core.info.name:
            raise FailedPreconditionError(
                "WRONG_BASE_MODEL", f"{path} is for {checkpoint.base_model}, this run uses {self._core.info.name}"
            )
        if with_optimizer and not checkpoint.has_optimizer_state:
            raise FailedPreconditionError(
                "NO_OPTIMIZER_STATE", f"{path} holds weights only; load it without optimizer state"
            )
        spec = convert.lora_spec(checkpoint.lora_config)
        return await asyncio.to_thread(checkpoint_files.decode, files, spec, with_optimizer)
