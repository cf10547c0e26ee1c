"""Finished operations reach clients only once their submission is in the state store.

A submit may be acknowledged before the store confirms it: at once when its client asked
so (the SDK does: it keeps each call until its result), or through a store outage, when
the scheduler keeps training (see journal.py). Its operation may finish meanwhile. Were its
result shown then, and this scheduler lost the leadership before storing it, the
next leader would know nothing of the operation while the client already holds its
result: the run's log would have a hole the client never re-sends, and every later call
would wait on it. So a finished operation whose submission is not yet stored is shown as
still running (GetOperation, WaitOperation, the completion feed) until it is; if the
leadership is lost first, the client's wait finds the operation gone and re-sends it
(same request id and seq_id), and the trainer, which applies a seq_id at most once,
gives the outcome back. Once the submission is stored, a new leader queues the
operation again and gets the same outcome, so the finish itself need not wait.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from tunemesh.errors import UnavailableError
from tunemesh_scheduler.core.journal import Journal
from tunemesh_scheduler.core.records import OperationRecord, OpState


class ReleaseGate:
    """Holds finished operations until the journal has stored their submission (their
    `ticket`), then `publish`es them in the order they finished."""

    def __init__(self, journal: Journal, publish: Callable[[OperationRecord], None]) -> None:
        self._journal = journal
        self._publish = publish
        self._held: list[OperationRecord] = []
        journal.on_synced.append(self._release)

    @property
    def held(self) -> int:
        return len(self._held)

    def stored(self, op: OperationRecord) -> bool:
        return op.ticket <= self._journal.synced_ticket

    def finished(self, op: OperationRecord) -> None:
        if self.stored(op):
            self._publish(op)
        else:
            self._held.append(op)

    def view(self, op: OperationRecord) -> OperationRecord:
        """The operation as clients may see it: a finished one not yet stored is RUNNING."""
        if not op.done or self.stored(op):
            return op
        return dataclasses.replace(op, state=OpState.RUNNING, end_time=None, result=None, error=None)

    async def wait_stored(self, op: OperationRecord, timeout_s: float) -> OperationRecord:
        """`view(op)` once its submission is stored or after `timeout_s`."""
        if op.done and not self.stored(op) and timeout_s > 0:
            try:
                await self._journal.synced(op.ticket, timeout_s)
            except UnavailableError:
                pass
        return self.view(op)

    def _release(self, synced: int) -> None:
        ready = [op for op in self._held if op.ticket <= synced]
        if ready:
            self._held = [op for op in self._held if op.ticket > synced]
            for op in ready:
                self._publish(op)


def remaining(deadline: float) -> float:
    """Seconds left until `deadline` on the running loop's clock."""
    return max(0.0, deadline - asyncio.get_running_loop().time())
