"""Fencing and exactly-once application of a run's operations on its adapter.

A fenced call names its run's epoch and the operation's seq_id. The ledger refuses a call
whose epoch is below the adapter's (a deposed scheduler, a batch from before the run
moved), and never applies one seq_id twice: a repeat of a seq_id waits for the first
application and gets its recorded outcome. So a scheduler that lost track of a call (it
restarted, or the call timed out) re-sends it and learns what happened, exactly once.

Outcomes are opaque to the ledger (the server records wire messages). The last
`RECENT` outcomes of each adapter are kept: a run has at most two operations out at a
time, and a scheduler keeps at most four of its finishes from the store at once (then
the next leader sends those again: tunemesh_scheduler/core/journal.py), so only a
repeat of a long-finished seq_id finds none (SEQ_ID_APPLIED).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from typing import Any

from tunemesh.errors import FailedPreconditionError, NotFoundError

RECENT = 16


@dataclasses.dataclass
class _Entry:
    epoch: int = 0
    applied_seq_id: int = 0
    outcomes: collections.OrderedDict[int, asyncio.Future] = dataclasses.field(
        default_factory=collections.OrderedDict
    )


class Ledger:
    """Per adapter: its epoch, the highest seq_id taken, recent outcomes."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def open(self, adapter_id: str, epoch: int) -> None:
        """A new adapter (or a re-created one: its history starts over)."""
        self._entries[adapter_id] = _Entry(epoch=epoch)

    def close(self, adapter_id: str) -> None:
        self._entries.pop(adapter_id, None)

    def summary(self) -> dict[str, tuple[int, int]]:
        """adapter id -> (epoch, applied seq_id)."""
        return {a: (e.epoch, e.applied_seq_id) for a, e in self._entries.items()}

    def check_epoch(self, adapter_id: str, epoch: int) -> None:
        """Raise STALE_EPOCH when the adapter is held at a higher epoch than `epoch`."""
        entry = self._entries.get(adapter_id)
        if entry is not None:
            _check_epoch(adapter_id, entry, epoch)

    def adopt(self, adapter_id: str, epoch: int) -> int:
        """Raise the adapter's epoch to `epoch`; returns the highest seq_id taken."""
        entry = self._entries.get(adapter_id)
        if entry is None:
            raise NotFoundError("ADAPTER_NOT_FOUND", f"adapter {adapter_id!r} is not on this node")
        _check_epoch(adapter_id, entry, epoch)
        entry.epoch = epoch
        return entry.applied_seq_id

    def admit(self, adapter_id: str, seq_id: int, epoch: int) -> asyncio.Future | None:
        """None: apply the call now, then `record` its outcome (if seq_id > 0). A future:
        the seq_id was taken before; await it for the first application's outcome.

        Raises FailedPreconditionError STALE_EPOCH (fenced off) or SEQ_ID_APPLIED (taken so
        long ago that its outcome is gone). An unknown adapter is the engine's to report.
        """
        entry = self._entries.get(adapter_id)
        if entry is None:
            return None
        _check_epoch(adapter_id, entry, epoch)
        if seq_id <= 0:
            return None
        if seq_id <= entry.applied_seq_id:
            first = entry.outcomes.get(seq_id)
            if first is None:
                raise FailedPreconditionError(
                    "SEQ_ID_APPLIED", f"seq_id {seq_id} of {adapter_id} was applied long ago; its outcome is gone"
                )
            return first
        entry.applied_seq_id = seq_id
        entry.outcomes[seq_id] = asyncio.get_running_loop().create_future()
        finished = [s for s, outcome in entry.outcomes.items() if outcome.done()]
        for old in finished[: max(0, len(entry.outcomes) - RECENT)]:  # never one still running
            del entry.outcomes[old]
        return None

    def release(self, adapter_id: str, seq_id: int, outcome: Any) -> None:
        """An admitted call that changed nothing (it failed before touching the adapter):
        repeats waiting on it get `outcome`, and the seq_id may be applied afresh."""
        entry = self._entries.get(adapter_id)
        self.record(adapter_id, seq_id, outcome)
        if entry is not None and seq_id > 0:
            entry.outcomes.pop(seq_id, None)
            if entry.applied_seq_id == seq_id:
                entry.applied_seq_id = seq_id - 1

    def record(self, adapter_id: str, seq_id: int, outcome: Any) -> None:
        """The outcome of an admitted call (repeats waiting on it get it too)."""
        entry = self._entries.get(adapter_id)
        first = entry.outcomes.get(seq_id) if entry is not None and seq_id > 0 else None
        if first is not None and not first.done():
            first.set_result(outcome)


def _check_epoch(adapter_id: str, entry: _Entry, epoch: int) -> None:
    if epoch and epoch < entry.epoch:
        raise FailedPreconditionError(
            "STALE_EPOCH", f"{adapter_id} is at epoch {entry.epoch}; a call of epoch {epoch} is refused"
        )
