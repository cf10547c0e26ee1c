"""Operation records: creation, request-id index, state transitions, long-poll waits."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

from tunemesh.errors import Code, NotFoundError, ResourceExhaustedError
from tunemesh_scheduler.metrics import SchedulerMetrics
from tunemesh_scheduler.core.ports import StoreWrite
from tunemesh_scheduler.core.records import STATEFUL_KINDS, OperationError, OperationRecord, OpKind, OpState
from tunemesh_scheduler.core.work import Work


class OperationStore:
    """All operations in memory, with cheap counters for status and metrics.

    Every state change goes through this class so the counters stay exact and waiters
    are woken exactly when an operation becomes done.
    """

    def __init__(self, clock: Callable[[], float], new_id: Callable[[], str],
                 metrics: SchedulerMetrics | None = None,
                 note: Callable[[StoreWrite], int] = lambda write: 0,
                 on_finish: Callable[[OperationRecord], None] = lambda op: None,
                 held: Callable[[OperationRecord], bool] = lambda op: False) -> None:
        self._note = note  # journals every created, finished and evicted operation
        self._on_finish = on_finish  # e.g. numbers the completion for WatchOperations
        self._held = held  # a finished op clients have not seen yet (core/release.py): not evicted
        self._clock = clock
        self._new_id = new_id
        self._metrics = metrics or SchedulerMetrics()
        self._ops: dict[str, OperationRecord] = {}
        self._requests: dict[tuple[str, str], OperationRecord] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._finished: collections.deque[OperationRecord] = collections.deque()  # by end_time
        self.by_state: collections.Counter[str] = collections.Counter()
        self.queued_by_tenant: collections.Counter[str] = collections.Counter()
        self.queued_tokens_by_tenant: collections.Counter[str] = collections.Counter()
        self.queued_by_node: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._ops)

    def create(
        self,
        *,
        tenant: str,
        run: str,
        seq_id: int,
        kind: OpKind,
        request_id: str,
        payload: Work,
        payload_digest: bytes | str,
        num_tokens: int,
        node_id: str,
        epoch: int = 0,
    ) -> OperationRecord:
        """Store a new QUEUED operation and index its request id."""
        op = OperationRecord(
            name=f"operations/{self._new_id()}",
            tenant=tenant,
            run=run,
            seq_id=seq_id,
            kind=kind,
            request_id=request_id,
            payload_digest=payload_digest,
            num_tokens=num_tokens,
            node_id=node_id,
            create_time=self._clock(),
            payload=payload,
            epoch=epoch,
        )
        self._ops[op.name] = op
        self.index_request(op, request_id)
        self._count(op, +1)
        op.ticket = self._note(StoreWrite(op, payload=payload))
        return op

    def restore(self, op: OperationRecord) -> None:
        """Adopt an operation from durable state (done, or QUEUED with its payload)."""
        op.ticket = 0  # stored already
        self._ops[op.name] = op
        self.index_request(op, op.request_id)
        self._count(op, +1)
        if op.done:
            self._finished.append(op)

    def index_request(self, op: OperationRecord, request_id: str) -> None:
        """Make `request_id` (if any) of the op's tenant resolve to `op`."""
        if request_id:
            self._requests.setdefault((op.tenant, request_id), op)

    def find_request(self, tenant: str, request_id: str) -> OperationRecord | None:
        """The operation first submitted by `tenant` with `request_id`, if any."""
        if not request_id:
            return None
        return self._requests.get((tenant, request_id))

    def get(self, tenant: str, name: str) -> OperationRecord:
        """The tenant's operation, or NotFoundError(OPERATION_NOT_FOUND)."""
        op = self._ops.get(name)
        if op is None or op.tenant != tenant:
            raise NotFoundError("OPERATION_NOT_FOUND", f"operation {name!r} not found")
        return op

    def check_tenant_room(self, tenant: str, num_tokens: int, max_ops: int, max_tokens: int) -> None:
        """ResourceExhausted(TENANT_QUEUE_FULL) when one more queued operation of
        `num_tokens` would take the tenant past `max_ops` queued operations or `max_tokens`
        queued tokens (0: no cap; an operation alone may be larger than the token cap).
        Retryable: the SDK backs off until the tenant's queue drains."""
        ops, tokens = self.queued_by_tenant[tenant], self.queued_tokens_by_tenant[tenant]
        if max_ops and ops >= max_ops:
            raise ResourceExhaustedError(
                "TENANT_QUEUE_FULL", f"tenant {tenant!r} has {ops} operations queued, the most it may have")
        if max_tokens and tokens and tokens + num_tokens > max_tokens:
            raise ResourceExhaustedError(
                "TENANT_QUEUE_FULL",
                f"tenant {tenant!r} has {tokens} tokens queued; {num_tokens} more would pass its {max_tokens}")

    def unfinished(self) -> list[OperationRecord]:
        """Operations not yet done (for shutdown)."""
        return [op for op in self._ops.values() if not op.done]

    def mark_running(self, op: OperationRecord) -> None:
        """QUEUED -> RUNNING (the op was handed to a trainer)."""
        self._metrics.queue_wait(op.tenant, self._clock() - op.create_time)
        self._move(op, OpState.RUNNING)

    def reassign(self, op: OperationRecord, node_id: str, epoch: int) -> None:
        """An unfinished op of a run that moved: it goes to `node_id` with `epoch`."""
        self._count(op, -1)
        op.node_id, op.epoch = node_id, epoch
        self._count(op, +1)

    def requeue(self, op: OperationRecord) -> None:
        """RUNNING -> QUEUED (its call goes out again)."""
        if op.state is OpState.RUNNING:
            self._move(op, OpState.QUEUED)

    def succeed(self, op: OperationRecord, result: Any) -> None:
        """Finish with a result."""
        op.result = result
        self._finish(op, OpState.SUCCEEDED)

    def fail(self, op: OperationRecord, error: OperationError) -> None:
        """Finish with an error."""
        op.error = error
        self._finish(op, OpState.FAILED)

    def cancel(self, op: OperationRecord) -> None:
        """Finish a QUEUED op as CANCELLED."""
        op.error = OperationError(Code.CANCELLED, "CANCELLED", "operation cancelled by the client")
        self._finish(op, OpState.CANCELLED)

    async def wait(self, op: OperationRecord, timeout_s: float) -> OperationRecord:
        """Return when `op` is done or after `timeout_s`, whichever comes first."""
        if op.done or timeout_s <= 0:
            return op
        event = self._events.get(op.name)
        if event is None:
            event = self._events[op.name] = asyncio.Event()
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
        except TimeoutError:
            pass
        return op

    def evict_finished(self, older_than: float) -> list[OperationRecord]:
        """Forget operations that finished before `older_than` (epoch seconds), up to the
        first one still held from clients; returns them (their durable records are the
        caller's to compact)."""
        evicted = []
        while self._finished and self._finished[0].end_time < older_than and not self._held(self._finished[0]):
            op = self._finished.popleft()
            del self._ops[op.name]
            if self._requests.get((op.tenant, op.request_id)) is op:
                del self._requests[(op.tenant, op.request_id)]
            self._count(op, -1)
            evicted.append(op)
        return evicted

    def _finish(self, op: OperationRecord, state: OpState) -> None:
        op.end_time = self._clock()
        op.payload = None  # the trainer has what it needs; free the memory
        self._finished.append(op)
        self._move(op, state)
        replayed = state is OpState.SUCCEEDED and op.kind in STATEFUL_KINDS  # kept until a snapshot
        self._note(StoreWrite(op, drop_call=not replayed, deferrable=True))  # nothing waits on it
        self._metrics.operation_finished(op.tenant, op.kind.value, state.value)
        self._on_finish(op)
        event = self._events.pop(op.name, None)
        if event is not None:
            event.set()

    def _move(self, op: OperationRecord, state: OpState) -> None:
        self._count(op, -1)
        op.state = state
        self._count(op, +1)

    def _count(self, op: OperationRecord, delta: int) -> None:
        self.by_state[op.state.value] += delta
        if op.state is OpState.QUEUED:
            self.queued_by_tenant[op.tenant] += delta
            self.queued_tokens_by_tenant[op.tenant] += delta * op.num_tokens
            self.queued_by_node[op.node_id] += delta
