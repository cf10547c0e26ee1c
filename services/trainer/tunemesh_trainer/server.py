"""gRPC servicer of tunemesh.internal.v1.TrainerService: decode, call core, encode.

Fenced calls (a seq_id and an epoch) pass the `Ledger` first: a stale epoch is refused,
a repeated seq_id gets the first application's outcome. The engine work of a call runs
to the end even when its caller goes away, so its outcome is always recorded.
"""

from __future__ import annotations

import asyncio
import logging

from tunemesh_internal.v1 import trainer_pb2, trainer_pb2_grpc
from tunemesh.v1 import sessions_pb2
from tunemesh.errors import Code, InvalidArgumentError, NotFoundError, TunemeshError, UnavailableError
from tunemesh_common.checkpoints.client import CheckpointStorageClient
from tunemesh_common.service.rpc import LeaderFence
from tunemesh_trainer import convert
from tunemesh_trainer.checkpoints import CheckpointBridge
from tunemesh_trainer.core import TrainerCore
from tunemesh_trainer.ledger import Ledger

log = logging.getLogger(__name__)
SNAPSHOT_KEEP_S = 600.0  # how long AwaitSnapshot can still report a written snapshot


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """Registered before the server starts; answers UNAVAILABLE LOADING until `attach`."""

    def __init__(self, node_id: str, address: str, metrics_url: str = "",
                 checkpoints: CheckpointStorageClient | None = None) -> None:
        self._core: TrainerCore | None = None
        self._bridge: CheckpointBridge | None = None
        self._storage = checkpoints or CheckpointStorageClient("")
        self._node_id = node_id
        self._address = address
        self._metrics_url = metrics_url
        self._tokenizer_files: list[sessions_pb2.TokenizerFile] = []
        self.ledger = Ledger()
        self.leader = LeaderFence()  # refuses calls of a deposed scheduler
        self._snapshots: dict[tuple[str, int], asyncio.Task] = {}  # (adapter, seq_id) -> write

    def attach(self, core: TrainerCore, tokenizer_files: dict[str, bytes]) -> None:
        """Start serving with a loaded engine."""
        self._tokenizer_files = [sessions_pb2.TokenizerFile(name=n, content=c) for n, c in tokenizer_files.items()]
        self._bridge = CheckpointBridge(core, self._storage)
        self._core = core

    @property
    def core(self) -> TrainerCore:
        if self._core is None:
            raise UnavailableError("LOADING", f"trainer {self._node_id} is still loading its base model")
        return self._core

    def node(self) -> trainer_pb2.TrainerNode:
        return trainer_pb2.TrainerNode(
            node_id=self._node_id,
            address=self._address,
            models=[convert.supported_model(self.core.info)],
            max_adapters=self.core.max_adapters,
            adapters=self.core.adapter_count(),
            metrics_url=self._metrics_url,
        )

    async def GetTrainerInfo(self, request, context):
        return trainer_pb2.GetTrainerInfoResponse(node=self.node())

    async def CreateAdapter(self, request, context):
        self.leader.check(context)
        self._check_base_model(request.base_model)
        count = await self.core.create_adapter(request.adapter_id, convert.lora_spec(request.lora_config))
        self.ledger.open(request.adapter_id, request.epoch)
        return trainer_pb2.CreateAdapterResponse(num_parameters=count)

    async def RestoreAdapter(self, request, context):
        self.leader.check(context)
        self._check_base_model(request.base_model)
        self.ledger.check_epoch(request.adapter_id, request.epoch)
        spec = convert.lora_spec(request.lora_config)
        state = None
        if request.path:  # read before the engine is asked, so the batch boundary is all it waits for
            state = await self._bridge.read(request.tenant, request.path, request.load_optimizer_state)
        try:
            step = await self.core.restore_adapter(request.adapter_id, spec, state)
        except BaseException:
            if not self.core.holds(request.adapter_id):
                self.ledger.close(request.adapter_id)  # a replaced copy is gone with the failed restore
            raise
        self.ledger.open(request.adapter_id, request.epoch)
        return trainer_pb2.RestoreAdapterResponse(step=step)

    def _check_base_model(self, base_model: str) -> None:
        """INVALID_ARGUMENT unless `base_model` (empty: any) is this node's (UNAVAILABLE while it loads)."""
        served = self.core.info.name
        if base_model and base_model != served:
            raise InvalidArgumentError("WRONG_BASE_MODEL", f"node {self._node_id} serves {served}, not {base_model}")

    async def DeleteAdapter(self, request, context):
        self.leader.check(context)
        await self.core.delete_adapter(request.adapter_id)
        self.ledger.close(request.adapter_id)
        return trainer_pb2.DeleteAdapterResponse()

    async def RunBatch(self, request, context):
        self.leader.check(context)
        fresh, repeats, early = [], {}, {}
        for item in request.items:
            try:
                first = self.ledger.admit(item.adapter_id, item.seq_id, item.epoch)
            except TunemeshError as err:
                early[item.item_id] = convert.item_error(item.item_id, int(err.rpc_code), err.reason, err.message)
                continue
            if first is not None:
                repeats[item.item_id] = first
            else:
                fresh.append(item)
        done, seconds = await asyncio.shield(asyncio.ensure_future(self._run_fresh(fresh)))
        for item_id, first in repeats.items():
            done[item_id] = _with_item_id(await asyncio.shield(first), item_id)  # shared: never cancel it
        return trainer_pb2.RunBatchResponse(
            results=[(done | early)[item.item_id] for item in request.items], engine_seconds=seconds
        )

    async def _run_fresh(self, items) -> tuple[dict[str, trainer_pb2.BatchItemResult], float]:
        """Execute admitted items and record each outcome in the ledger, whatever happens."""
        decoded, optims, done = [], [], {}
        for item in items:
            try:
                if item.kind == trainer_pb2.ITEM_KIND_OPTIM_STEP:
                    optims.append(convert.optim_item(item))
                else:
                    decoded.append(convert.engine_item(item))
            except TunemeshError as err:
                done[item.item_id] = convert.item_error(item.item_id, int(err.rpc_code), err.reason, err.message)
        seconds = 0.0
        try:
            if decoded or optims:
                outcomes, seconds = await self.core.run_batch(decoded, optims)
                optim_ids = {o.item_id for o in optims}
                done |= {o.item_id: convert.item_result(o, o.item_id in optim_ids) for o in outcomes}
                self._write_snapshots(items, outcomes)
        except TunemeshError as err:
            for item in items:
                done.setdefault(item.item_id, convert.item_error(item.item_id, int(err.rpc_code), err.reason, err.message))
            raise
        except BaseException:
            for item in items:
                done.setdefault(item.item_id, convert.item_error(item.item_id, int(Code.INTERNAL), "ENGINE_ERROR", "the batch failed"))
            raise
        finally:
            for item in items:
                if item.item_id in done:
                    self.ledger.record(item.adapter_id, item.seq_id, done[item.item_id])
        return done, seconds

    async def OptimStep(self, request, context):
        metrics = await self.core.optim_step(request.adapter_id, convert.adam_spec(request.adam_params))
        return trainer_pb2.OptimStepResponse(metrics=metrics)

    async def GetTokenizer(self, request, context):
        self.core  # UNAVAILABLE LOADING until the model is attached
        return trainer_pb2.GetTokenizerResponse(files=self._tokenizer_files)

    async def SaveAdapter(self, request, context):
        self.leader.check(context)
        self.core  # UNAVAILABLE LOADING until the model is attached

        async def save():
            return trainer_pb2.SaveAdapterResponse(checkpoint=await self._bridge.save(request))

        return await self._fenced(request, save)

    async def LoadAdapter(self, request, context):
        self.leader.check(context)
        self.core

        async def load():
            return trainer_pb2.LoadAdapterResponse(step=await self._bridge.load(request))

        return await self._fenced(request, load)

    async def AdoptAdapter(self, request, context):
        self.leader.check(context)
        self.core
        applied = self.ledger.adopt(request.adapter_id, request.epoch)
        return trainer_pb2.AdoptAdapterResponse(applied_seq_id=applied)

    async def ListAdapters(self, request, context):
        adapters = [trainer_pb2.AdapterSummary(adapter_id=a, epoch=epoch, applied_seq_id=applied)
                    for a, (epoch, applied) in sorted(self.ledger.summary().items())]
        return trainer_pb2.ListAdaptersResponse(adapters=adapters)

    def _settle(self, request, outcome) -> None:
        """Record a fenced save's or load's outcome; one that raised changed nothing (a
        save writes elsewhere, a load touches the adapter last), so its seq_id may run
        again (e.g. once the checkpoint service is back)."""
        if isinstance(outcome, BaseException):
            self.ledger.release(request.adapter_id, request.seq_id, outcome)
        else:
            self.ledger.record(request.adapter_id, request.seq_id, outcome)

    async def AwaitSnapshot(self, request, context):
        task = self._snapshots.get((request.adapter_id, request.seq_id))
        if task is None:
            raise NotFoundError("SNAPSHOT_NOT_FOUND", f"no snapshot of {request.adapter_id} after seq_id {request.seq_id}")
        return trainer_pb2.AwaitSnapshotResponse(checkpoint=await asyncio.shield(task))

    def _write_snapshots(self, items, outcomes) -> None:
        """Start writing the snapshots the batch's optimizer steps took (off the hot path)."""
        taken = {o.item_id: o.snapshot for o in outcomes if o.snapshot is not None}
        for item in items:
            if item.item_id in taken:
                key = (item.adapter_id, item.seq_id)
                write = self._bridge.write(taken[item.item_id], item.snapshot.tenant, item.snapshot.path, True)
                self._snapshots[key] = task = asyncio.ensure_future(write)
                task.add_done_callback(lambda t, key=key: self._forget_snapshot(key, t))

    def _forget_snapshot(self, key: tuple[str, int], task: asyncio.Task) -> None:
        """Keep a written snapshot's task a while for AwaitSnapshot, then drop it."""
        if not task.cancelled() and task.exception() is not None:
            log.warning("snapshot %s of %s failed: %r", key[1], key[0], task.exception())
        asyncio.get_running_loop().call_later(SNAPSHOT_KEEP_S, self._snapshots.pop, key, None)

    async def _fenced(self, request, call):
        """Run a single fenced call once: a repeat of its seq_id gets the first outcome
        (a response, or the error it raised)."""
        first = self.ledger.admit(request.adapter_id, request.seq_id, request.epoch)
        if first is None:
            first = asyncio.ensure_future(_outcome_of(call()))
            first.add_done_callback(lambda f: f.cancelled() or self._settle(request, f.result()))
        outcome = await asyncio.shield(first)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


async def _outcome_of(call) -> object:
    """The call's response, or the exception it raised, as a value."""
    try:
        return await call
    except Exception as exc:  # noqa: BLE001 - re-raised to every caller of this seq_id
        return exc


def _with_item_id(result: trainer_pb2.BatchItemResult, item_id: str) -> trainer_pb2.BatchItemResult:
    copy = trainer_pb2.BatchItemResult()
    copy.CopyFrom(result)
    copy.item_id = item_id
    return copy
