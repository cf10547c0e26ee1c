"""Automatic snapshots of runs, and moving a run whose trainer is gone.

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

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from tunemesh_common import checkpoint_paths
from tunemesh_common.errors import TunemeshError, Unavailable
from tunemesh_scheduler.core.ports import (
    BatchItem, Fence, LoadRequest, PlacementPort, RunStore, SnapshotTarget, StoreWrite, TrainerPort,
)
from tunemesh_scheduler.core.records import STATEFUL_KINDS, OperationRecord, OpKind, OpState, RunRecord

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = checkpoint_paths.SNAPSHOT_PREFIX
REPLAYED = STATEFUL_KINDS
# Errors that do not say a call certainly failed where it went: sent again, never final.
IN_DOUBT_REASONS = frozenset({"TRAINER_UNAVAILABLE", "TRAINER_GONE", "ADAPTER_NOT_FOUND"})


@dataclasses.dataclass(frozen=True)
class SnapshotPolicy:
    every_steps: int = 8  # 0: never by steps
    every_s: float = 300.0  # 0: never by time


def snapshot_path(run_name: str, seq_id: int) -> str:
    return f"tunemesh://{run_name}/state/{SNAPSHOT_PREFIX}{seq_id:012d}"


@dataclasses.dataclass
class _RunProgress:
    step_at_snapshot: int
    time_at_snapshot: float
    pending: bool = False  # a snapshot is being written


class RunMover:
    """Snapshot bookkeeping and moves, for the core (which owns runs, lanes and ops)."""

    def __init__(self, trainer: TrainerPort, placement: PlacementPort, store: RunStore | None,
                 note: Callable[[StoreWrite], int], clock: Callable[[], float],
                 policy: SnapshotPolicy = SnapshotPolicy(), retry_s: float = 2.0) -> None:
        self._trainer, self._placement, self._store = trainer, placement, store
        self._note, self._clock, self._policy, self._retry_s = note, clock, policy, retry_s
        self._progress: dict[str, _RunProgress] = {}
        self.moving: dict[str, asyncio.Task] = {}  # run name -> its move
        self._tasks: set[asyncio.Task] = set()

    @property
    def enabled(self) -> bool:
        """Moves need the kept calls, so they need a store."""
        return self._store is not None

    def forget(self, run: str) -> None:
        self._progress.pop(run, None)

    # ---- snapshots -------------------------------------------------------------------

    def mark_snapshot(self, run: RunRecord, op: OperationRecord) -> None:
        """Ask for a snapshot after OPTIM_STEP `op` when one is due."""
        if not self.enabled or op.kind is not OpKind.OPTIM_STEP:
            return
        progress = self._progress.setdefault(run.name, _RunProgress(run.step, self._clock()))
        steps_due = self._policy.every_steps and run.step + 1 - progress.step_at_snapshot >= self._policy.every_steps
        time_due = self._policy.every_s and self._clock() - progress.time_at_snapshot >= self._policy.every_s
        if not progress.pending and (steps_due or time_due):
            op.snapshot_path = snapshot_path(run.name, op.seq_id)
            progress.pending = True

    def snapshot_target(self, op: OperationRecord) -> SnapshotTarget | None:
        return SnapshotTarget(op.snapshot_path, op.tenant) if op.snapshot_path else None

    def on_finished(self, run: RunRecord, op: OperationRecord) -> None:
        """An operation of `run` finished: confirm its snapshot, if it asked for one."""
        if not op.snapshot_path:
            return
        progress = self._progress[run.name]
        if op.state is not OpState.SUCCEEDED:
            progress.pending = False
            return
        self._spawn(self._confirm(run, op, progress))

    async def _confirm(self, run: RunRecord, op: OperationRecord, progress: _RunProgress) -> None:
        try:
            await self._trainer.await_snapshot(op.node_id, run.name, op.seq_id)
        except TunemeshError as exc:
            log.warning("snapshot after %s of %s failed: %s", op.seq_id, run.name, exc, extra={"run": run.name})
            progress.pending = False
            return
        if run.name in self.moving:  # the move builds on the snapshot it started from
            progress.pending = False
            return
        previous = run.snapshot_path
        if op.seq_id > run.snapshot_seq_id:
            run.snapshot_path, run.snapshot_seq_id = op.snapshot_path, op.seq_id
            self._note(StoreWrite(run, trim_through=op.seq_id))
        progress.step_at_snapshot, progress.time_at_snapshot = run.step, self._clock()
        progress.pending = False
        log.info("snapshot of %s after seq_id %d", run.name, op.seq_id, extra={"run": run.name})
        if previous and previous != run.snapshot_path:
            try:
                await self._trainer.delete_checkpoint(run.tenant, previous)
            except TunemeshError as exc:
                log.info("could not delete superseded snapshot %s: %s", previous, exc)

    # ---- freezing --------------------------------------------------------------------

    def freeze(self, run: RunRecord) -> None:
        """Release an idle run's adapter slot (its session ended): its snapshot and kept
        calls rebuild it exactly when it is resumed."""
        if self.enabled and run.name not in self.moving:
            task = self._spawn(self._freeze(run))
            self.moving[run.name] = task  # no call goes out meanwhile
            task.add_done_callback(lambda t: self.moving.pop(run.name, None) if self.moving.get(run.name) is t else None)

    async def _freeze(self, run: RunRecord) -> None:
        node = run.node_id
        try:
            await self._trainer.delete_adapter(node, run.name)
        except TunemeshError as exc:
            log.info("freezing %s: its adapter on %s: %s", run.name, node, exc, extra={"run": run.name})
        try:
            await self._placement.release(run.name, node)
        except TunemeshError as exc:
            log.info("freezing %s: releasing its placement: %s", run.name, exc, extra={"run": run.name})
        run.node_id = ""
        self._note(StoreWrite(run))
        log.info("run %s frozen (its session ended); its slot on %s is free", run.name, node, extra={"run": run.name})

    # ---- moves -----------------------------------------------------------------------

    def move(self, run: RunRecord, history: Callable[[], list[OperationRecord]],
             done: Callable[[RunRecord], None]) -> None:
        """Start moving `run` (once): `history()` gives its operations by seq_id,
        `done(run)` is called when it serves again on its new node."""
        if run.name in self.moving or not self.enabled:
            return
        task = self._spawn(self._move_until_done(run, history, done))
        self.moving[run.name] = task
        task.add_done_callback(lambda t: self.moving.pop(run.name, None) if self.moving.get(run.name) is t else None)

    async def _move_until_done(self, run, history, done) -> None:
        while True:
            try:
                await self._move_once(run, history())
            except TunemeshError as exc:
                log.warning("moving %s failed (%s); retrying in %.0fs", run.name, exc, self._retry_s,
                            extra={"run": run.name})
                await asyncio.sleep(self._retry_s)
                continue
            self.moving.pop(run.name, None)  # before `done`: it sends the run's waiting ops
            done(run)
            return

    async def _move_once(self, run: RunRecord, ops: list[OperationRecord]) -> None:
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
        await self._replay(run, node, epoch, ops, after)
        run.node_id, run.epoch = node, epoch
        self._note(StoreWrite(run))

    async def _replay(self, run: RunRecord, node: str, epoch: int, ops: list[OperationRecord], after: int) -> None:
        """Apply again every finished call after seq_id `after` (the snapshot's) that
        changed the adapter. A call answered in doubt fails the move (it is retried)."""
        replayed = [op for op in ops if after < op.seq_id <= run.last_seq_id
                    and op.state is OpState.SUCCEEDED and op.kind in REPLAYED]
        if not replayed:
            return
        calls = await self._store.payloads(run.name, after)
        for op in replayed:
            call = calls.get(op.seq_id)
            if call is None:
                raise _lost_call(run, op)
            fence = Fence(op.seq_id, epoch)
            if op.kind is OpKind.LOAD_STATE:
                await self._trainer.load_adapter(node, run.name, run.tenant, call, fence)
                continue
            item = BatchItem(op.name, run.name, op.kind, call, op.num_tokens, fence)
            (outcome,) = await self._trainer.run_batch(node, [item])
            if outcome.error is not None and outcome.error.reason in IN_DOUBT_REASONS:
                raise Unavailable(outcome.error.reason, f"replay of seq_id {op.seq_id}: {outcome.error.message}")
            if outcome.error is not None:
                log.error("replay of seq_id %d of %s failed although it succeeded before: %s", op.seq_id, run.name,
                          outcome.error, extra={"run": run.name})
        log.info("replayed %d calls of %s on %s", len(replayed), run.name, node, extra={"run": run.name})

    def spawn(self, coro) -> asyncio.Task:
        """Run `coro` as a task the mover cancels when it stops."""
        return self._spawn(coro)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _lost_call(run: RunRecord, op: OperationRecord) -> TunemeshError:
    from tunemesh_common.errors import DataLoss

    return DataLoss("CALL_NOT_KEPT", f"seq_id {op.seq_id} of {run.name} was not kept; the run cannot be replayed")
