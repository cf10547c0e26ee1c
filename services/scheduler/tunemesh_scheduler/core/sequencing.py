"""Per-run ordering: a run's operations execute one at a time, in seq_id order.

A run's head is the operation with seq_id = last_seq_id + 1. It is released (handed to
the node dispatcher) once every earlier operation is done — succeeded, failed or
cancelled all count, so one failed call never blocks the rest of the run. When later
operations wait for a head that has not arrived, a gap deadline is set; `expire(now)`
past it fails the waiting operations with SEQ_ID_GAP, so no client hangs forever. The
lane owns no timer: time comes in through `expire` (the core's `tick`).
"""

from __future__ import annotations

from collections.abc import Callable

from tunemesh_scheduler.core.records import OperationRecord, OpState, RunRecord


class RunLane:
    """Ordering state of one run."""

    def __init__(
        self,
        run: RunRecord,
        gap_timeout_s: float,
        on_ready: Callable[[OperationRecord], None],
        on_gap: Callable[[RunLane, list[OperationRecord]], None],
        clock: Callable[[], float],
    ) -> None:
        self.run = run
        self.head: OperationRecord | None = None  # released, not yet done
        self._gap_timeout_s = gap_timeout_s
        self._on_ready = on_ready
        self._on_gap = on_gap
        self._by_seq: dict[int, OperationRecord] = {}  # every op ever, for idempotency
        self._pending: dict[int, OperationRecord] = {}  # ops with seq_id > last_seq_id
        self._clock = clock
        self.gap_deadline: float | None = None  # when the waiting ops fail, if the gap stays

    @property
    def next_seq_id(self) -> int:
        return self.run.last_seq_id + 1

    def find(self, seq_id: int) -> OperationRecord | None:
        """The operation submitted with `seq_id`, if any."""
        return self._by_seq.get(seq_id)

    def history(self) -> list[OperationRecord]:
        """Every operation the lane still knows, by seq_id."""
        return [self._by_seq[seq] for seq in sorted(self._by_seq)]

    def unfinished(self) -> list[OperationRecord]:
        return [op for op in self._pending.values() if not op.done]

    def idle(self) -> bool:
        """No operation of the run is queued or running."""
        return self.head is None and all(op.done for op in self._pending.values())

    def forget(self, op: OperationRecord) -> None:
        """Drop an evicted (long finished) operation from the idempotency index."""
        if self._by_seq.get(op.seq_id) is op and op.seq_id <= self.run.last_seq_id:
            del self._by_seq[op.seq_id]

    def restore(self, op: OperationRecord) -> None:
        """Adopt an operation from durable state (call `pump` after the last one)."""
        self._by_seq[op.seq_id] = op
        if op.seq_id > self.run.last_seq_id:
            self._pending[op.seq_id] = op

    def add(self, op: OperationRecord) -> None:
        """Accept a new QUEUED operation; releases it at once if it is the head."""
        self._by_seq[op.seq_id] = op
        self._pending[op.seq_id] = op
        self.pump()

    def on_done(self, op: OperationRecord) -> None:
        """Note that `op` finished (or was cancelled) and release the next head."""
        if op is self.head:
            self.head = None
        self.pump()

    def pump(self) -> None:
        """Advance past done operations; release the head or (re)arm the gap timer."""
        if self.head is not None:
            return
        while (op := self._pending.get(self.next_seq_id)) is not None and op.done:
            del self._pending[op.seq_id]
            self.run.last_seq_id = op.seq_id
        if op is not None:
            self._disarm()
            self.head = op
            if op.state is OpState.QUEUED:  # a RUNNING one already went out with the previous op
                self._on_ready(op)
        elif any(p.state is OpState.QUEUED for p in self._pending.values()):
            self._arm()
        else:
            self._disarm()

    def close(self) -> None:
        """Drop the gap deadline (scheduler shutdown)."""
        self._disarm()

    def expire(self, now: float) -> None:
        """Fail the operations waiting on a gap whose deadline passed."""
        if self.gap_deadline is None or now < self.gap_deadline:
            return
        self.gap_deadline = None
        waiting = [p for p in self._pending.values() if p.state is OpState.QUEUED]
        if waiting:
            self._on_gap(self, waiting)

    def _arm(self) -> None:
        if self.gap_deadline is None:
            self.gap_deadline = self._clock() + self._gap_timeout_s

    def _disarm(self) -> None:
        self.gap_deadline = None
