"""What the scheduler machine asks its driver to do (`SchedulerMachine.next_actions`)."""

from __future__ import annotations

import dataclasses
from typing import Union

from tunemesh_scheduler.core.ports import BatchItem
from tunemesh_scheduler.core.records import OperationRecord, RunRecord


@dataclasses.dataclass(eq=False)
class Batch:
    """One trainer round of `node_id`: `items[i]` is the call of `ops[i]`."""

    node_id: str
    ops: list[OperationRecord]
    items: list[BatchItem]
    sent_at: float = 0.0  # the machine's clock when it went out


@dataclasses.dataclass(eq=False)
class Single:
    """A checkpoint save or load of one run (ordered like its other operations)."""

    op: OperationRecord


@dataclasses.dataclass(eq=False)
class Move:
    """Re-place `run` with a raised epoch, load its snapshot, replay `history` after it."""

    run: RunRecord
    history: list[OperationRecord]  # the run's known operations, by seq_id
    # (seq_id, path) of snapshots asked for after steps that succeeded, newer than the run's
    # snapshot and not confirmed (the trainer may have died as it wrote them), newest first:
    # the move starts from the newest the store has.
    unconfirmed: tuple[tuple[int, str], ...] = ()


@dataclasses.dataclass(eq=False)
class Freeze:
    """Release an idle run's adapter slot (its session ended)."""

    run: RunRecord


@dataclasses.dataclass(eq=False)
class ConfirmSnapshot:
    """Wait until the snapshot asked for after `op` is written."""

    run: RunRecord
    op: OperationRecord


@dataclasses.dataclass(eq=False)
class FreeMovedAway:
    """List the adapters `node_id` holds and free those of runs placed elsewhere now."""

    node_id: str


Action = Union[Batch, Single, Move, Freeze, ConfirmSnapshot, FreeMovedAway]
