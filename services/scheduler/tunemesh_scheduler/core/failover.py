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
are refused from then on), its adapter is created there and loaded from the latest
snapshot (or the checkpoint it was created from); the calls after the snapshot that
changed the adapter are fetched from the store, and the machine replays them in seq_id
order with their original seq_ids, through the normal dispatch. The engine is
batch-invariant, so the replay reproduces the same numbers; the operations waiting on
the run then go to the new trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tunemesh.errors import DataLossError, TunemeshError
from tunemesh_scheduler.core.actions import ConfirmSnapshot, Freeze, Move
from tunemesh_scheduler.core.ports import PlacementPort, RunStore, TrainerPort
from tunemesh_scheduler.core.work import LoadRequest, Work
from tunemesh_scheduler.core.records import STATEFUL_KINDS, OperationRecord, OpState, RunRecord

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

    async def move(self, action: Move, placed: Callable[[str], None] = lambda node: None,
                   ) -> tuple[str, int, list[tuple[OperationRecord, Work]], tuple[int, str] | None]:
        """Rebuild the run's adapter on a live trainer, up to its snapshot, or the newest
        of `action.unconfirmed` the store has (`placed(node)` once the trainer is chosen).
        Returns the (node, epoch) it serves with now, the calls to replay there after the
        snapshot (every finished call that changed the adapter, in seq_id order, with the
        call itself; the machine sends them) and the unconfirmed snapshot it started from
        (None: the run's own)."""
        run = action.run
        old_node, snapshot, after = run.node_id, run.snapshot_path, run.snapshot_seq_id
        node = await self._placement.move(run.name, run.base_model, old_node)
        placed(node)
        started_from = await self._newest_written(run, action.unconfirmed)
        if started_from is not None:
            after, snapshot = started_from
        epoch = run.epoch + 1
        log.info("moving %s from %s to %s (epoch %d, snapshot after seq_id %d)", run.name, old_node or "(frozen)",
                 node, epoch, after, extra={"run": run.name})
        start = LoadRequest(snapshot, True) if snapshot else run.origin
        # One call: any stale copy (the same node, back) is replaced, and the node reads the
        # checkpoint before it waits for a batch boundary to create and load the adapter.
        await self._trainer.restore_adapter(node, run.name, run.base_model, run.lora, epoch, run.tenant, start)
        return node, epoch, await self._calls_to_replay(run, action.history, after), started_from

    async def _newest_written(self, run: RunRecord, unconfirmed: tuple[tuple[int, str], ...],
                              ) -> tuple[int, str] | None:
        """The newest of `unconfirmed` (newest first) the checkpoint service holds: a
        committed checkpoint is whole, and its step succeeded, so it is the run's state
        then, whoever wrote it."""
        for seq_id, path in unconfirmed:
            try:
                if await self._trainer.checkpoint_exists(run.tenant, path):
                    return seq_id, path
            except TunemeshError as exc:
                log.info("could not ask for snapshot %s of %s: %s", path, run.name, exc, extra={"run": run.name})
                return None
        return None

    async def _calls_to_replay(self, run: RunRecord, ops: list[OperationRecord],
                               after: int) -> list[tuple[OperationRecord, Work]]:
        replayed = [op for op in ops if after < op.seq_id <= run.last_seq_id
                    and op.state is OpState.SUCCEEDED and op.kind in REPLAYED]
        if not replayed:
            return []
        calls = await self._store.payloads(run.name, after)
        missing = [op.seq_id for op in replayed if op.seq_id not in calls]
        if missing:
            raise DataLossError("CALL_NOT_KEPT", f"seq_id {missing[0]} of {run.name} was not kept; the run cannot be replayed")
        return [(op, calls[op.seq_id]) for op in replayed]

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
