"""The calls behind a run's automatic snapshots, moves and freezes.

`SchedulerMachine` decides (when a snapshot is due, which run moves, when it is frozen);
`FailoverCalls` makes the trainer, placement and store calls those decisions need, for
the driver. Nothing here keeps state between calls.

Snapshots: every `every_steps` optimizer steps (or `every_s` seconds) of a run, its next
OPTIM_STEP asks the trainer to copy the adapter right after the step (weights and AdamW
state; gradients are clear then) and write it to the checkpoint service in the
background. Once the trainer confirms it, the run's record names it, the calls it
covers are dropped from the store and the snapshot before it is deleted.

Moving: when a run's trainer leaves (its lease lapsed) or lost the adapter, the run is
re-placed on a live trainer of its model with a raised epoch (the old trainer's calls
are refused from then on), its adapter is created there, loaded from the latest
snapshot (or the checkpoint it was created from), and every call after the snapshot
that changed the adapter is replayed in seq_id order with its original seq_id. The
engine is batch-invariant, so the replay reproduces the same numbers; the operations
waiting on the run then go to the new trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tunemesh_common.errors import DataLoss, TunemeshError, Unavailable
from tunemesh_scheduler.core.machine import IN_DOUBT_REASONS, ConfirmSnapshot, Freeze, Move
from tunemesh_scheduler.core.ports import BatchItem, Fence, LoadRequest, PlacementPort, RunStore, TrainerPort
from tunemesh_scheduler.core.records import STATEFUL_KINDS, OperationRecord, OpKind, OpState, RunRecord

log = logging.getLogger(__name__)

REPLAYED = STATEFUL_KINDS


class FailoverCalls:
    """Executes `Move`, `Freeze` and `ConfirmSnapshot` actions."""

    def __init__(self, trainer: TrainerPort, placement: PlacementPort, store: RunStore | None) -> None:
        self._trainer, self._placement, self._store = trainer, placement, store

    async def confirm(self, action: ConfirmSnapshot) -> None:
        """Wait until the trainer wrote the snapshot (raises TunemeshError when it failed)."""
        await self._trainer.await_snapshot(action.op.node_id, action.run.name, action.op.seq_id)

    async def delete_snapshot(self, run: RunRecord, path: str) -> None:
        try:
            await self._trainer.delete_checkpoint(run.tenant, path)
        except TunemeshError as exc:
            log.info("could not delete superseded snapshot %s: %s", path, exc)

    async def freeze(self, action: Freeze) -> None:
        """Free the run's adapter and placement (failures are logged: a later scheduler's
        takeover frees what is left)."""
        run, node = action.run, action.run.node_id
        try:
            await self._trainer.delete_adapter(node, run.name)
        except TunemeshError as exc:
            log.info("freezing %s: its adapter on %s: %s", run.name, node, exc, extra={"run": run.name})
        try:
            await self._placement.release(run.name, node)
        except TunemeshError as exc:
            log.info("freezing %s: releasing its placement: %s", run.name, exc, extra={"run": run.name})
        log.info("run %s frozen (its session ended); its slot on %s is free", run.name, node, extra={"run": run.name})

    async def move(self, action: Move) -> tuple[str, int]:
        """Rebuild the run on a live trainer; returns (node, epoch) it serves with now."""
        run = action.run
        old_node, snapshot, after = run.node_id, run.snapshot_path, run.snapshot_seq_id
        node = await self._placement.move(run.name, run.base_model, old_node)
        epoch = run.epoch + 1
        log.info("moving %s from %s to %s (epoch %d, snapshot after seq_id %d)", run.name, old_node or "(frozen)",
                 node, epoch, after, extra={"run": run.name})
        try:
            await self._trainer.delete_adapter(node, run.name)  # a stale copy (the same node, back)
        except TunemeshError:
            pass
        await self._trainer.create_adapter(node, run.name, run.base_model, run.lora, epoch)
        start = LoadRequest(snapshot, True) if snapshot else run.origin
        if start is not None:
            await self._trainer.load_adapter(node, run.name, run.tenant, start, Fence(0, epoch))
        await self._replay(run, node, epoch, action.history, after)
        return node, epoch

    async def _replay(self, run: RunRecord, node: str, epoch: int, ops: list[OperationRecord], after: int) -> None:
        """Apply again every finished call after seq_id `after` (the snapshot's) that
        changed the adapter. A call answered in doubt fails the move (it is retried)."""
        replayed = [op for op in ops if after < op.seq_id <= run.last_seq_id
                    and op.state is OpState.SUCCEEDED and op.kind in REPLAYED]
        if not replayed:
            return
        calls = await self._store.payloads(run.name, after)
        items = []  # the batchable calls waiting to go, at most a forward op and its optim_step
        for op in replayed:
            call = calls.get(op.seq_id)
            if call is None:
                raise DataLoss("CALL_NOT_KEPT",
                               f"seq_id {op.seq_id} of {run.name} was not kept; the run cannot be replayed")
            fence = Fence(op.seq_id, epoch)
            if op.kind is OpKind.LOAD_STATE:
                await self._replay_batch(run, node, items)
                items = []
                await self._trainer.load_adapter(node, run.name, run.tenant, call, fence)
                continue
            # An optim_step rides with the forward op right before it, as in dispatch:
            # the trainer applies a batch's optimizer items after its fused pass.
            rides = op.kind is OpKind.OPTIM_STEP and items and items[-1].kind is not OpKind.OPTIM_STEP \
                and items[-1].fence.seq_id == op.seq_id - 1
            if not rides:
                await self._replay_batch(run, node, items)
                items = []
            items.append(BatchItem(op.name, run.name, op.kind, call, op.num_tokens, fence))
        await self._replay_batch(run, node, items)
        log.info("replayed %d calls of %s on %s", len(replayed), run.name, node, extra={"run": run.name})

    async def _replay_batch(self, run: RunRecord, node: str, items: list[BatchItem]) -> None:
        if not items:
            return
        outcomes = await self._trainer.run_batch(node, items)
        for item, outcome in zip(items, outcomes, strict=True):
            if outcome.error is not None and outcome.error.reason in IN_DOUBT_REASONS:
                raise Unavailable(outcome.error.reason, f"replay of seq_id {item.fence.seq_id}: {outcome.error.message}")
            if outcome.error is not None:
                log.error("replay of seq_id %d of %s failed although it succeeded before: %s", item.fence.seq_id,
                          run.name, outcome.error, extra={"run": run.name})

    async def free_moved_away(self, node_id: str, moved_away: Callable[[str, str], bool]) -> None:
        """Free the adapters `node_id` holds of runs for which `moved_away(node, run)`."""
        try:
            held = await self._trainer.list_adapters(node_id)
        except TunemeshError as exc:
            log.info("could not list the adapters of %s: %s", node_id, exc)
            return
        for adapter in held:
            if not moved_away(node_id, adapter):
                continue
            try:
                await self._trainer.delete_adapter(node_id, adapter)
                log.info("freed %s on %s: the run moved away", adapter, node_id)
            except TunemeshError as exc:
                log.info("could not free %s on %s: %s", adapter, node_id, exc)
