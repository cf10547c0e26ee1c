"""Per-node dispatch: batches of forward / forward_backward / optim_step across runs.

Each trainer node has one dispatcher task and at most one batch in flight: while it
runs, newly ready operations accumulate and join the next batch. Per-run order is kept
by `RunLane` (a run has at most one op out at a time), so a batch holds at most one op
of each run. Other kinds (checkpoint saves and loads) start as their own tasks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from tunemesh_common.errors import Code, TunemeshError, Unimplemented
from tunemesh_common.metrics import SchedulerMetrics
from tunemesh_scheduler.core.fairness import FairQueue
from tunemesh_scheduler.core.ports import BatchItem, Fence, ItemOutcome, SnapshotTarget, TrainerPort
from tunemesh_scheduler.core.records import (
    BATCHABLE_KINDS,
    OperationError,
    OperationRecord,
)

log = logging.getLogger(__name__)

OnDone = Callable[[OperationRecord, ItemOutcome], None]


class NodeDispatcher:
    """Sends one node's ready operations to its trainer."""

    def __init__(
        self,
        node_id: str,
        trainer: TrainerPort,
        mark_running: Callable[[OperationRecord], None],
        on_done: OnDone,
        token_budget: int,
        batch_wait_s: float,
        companion_of: Callable[[OperationRecord], OperationRecord | None] = lambda op: None,
        run_single: Callable[[OperationRecord], Awaitable[Any]] | None = None,
        metrics: SchedulerMetrics | None = None,
    ) -> None:
        self.node_id = node_id
        self._metrics = metrics or SchedulerMetrics()
        self._run_single_call = run_single
        self._companion_of = companion_of
        self._trainer = trainer
        self._mark_running = mark_running
        self._on_done = on_done
        self._token_budget = token_budget
        self._batch_wait_s = batch_wait_s
        self._ready = FairQueue()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._singles: set[asyncio.Task] = set()
        self.batch_running = False
        self.batches_total = 0
        self.batch_items_total = 0
        self.batch_tokens_total = 0

    def start(self) -> None:
        """Start the dispatcher task (needs a running loop)."""
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name=f"dispatch:{self.node_id}"
        )

    async def stop(self) -> None:
        """Cancel the dispatcher and every in-flight call."""
        tasks = [t for t in (self._task, *self._singles) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def enqueue(self, op: OperationRecord) -> None:
        """Hand over a run's released head operation."""
        if op.kind in BATCHABLE_KINDS:
            self._ready.push(op)
            self._wake.set()
        else:
            self._start_single(op)

    def discard(self, op: OperationRecord) -> bool:
        """Withdraw a still-waiting operation (cancel); True when it was waiting."""
        return self._ready.discard(op)

    def snapshot(self) -> dict[str, Any]:
        return {
            "ready": len(self._ready),
            "ready_by_tenant": self._ready.depth_by_tenant(),
            "batch_running": self.batch_running,
            "singles_running": len(self._singles),
            "batches_total": self.batches_total,
            "batch_items_total": self.batch_items_total,
            "batch_tokens_total": self.batch_tokens_total,
        }

    async def _loop(self) -> None:
        backlog = False  # ops left over from the last batch go at once, no merge window
        while True:
            if not self._ready:
                self._wake.clear()
                await self._wake.wait()
                backlog = False
            if not backlog and self._batch_wait_s > 0:
                await asyncio.sleep(self._batch_wait_s)  # let other tenants' ops join
            heads = self._ready.take(self._token_budget) if self._ready else []  # may be empty: cancelled
            if heads:
                try:
                    await self._run_batch(heads)
                except Exception:  # a bug here must not stop this node's dispatching for good
                    log.exception("dispatching a batch to %s failed", self.node_id)
                backlog = True

    async def _run_batch(self, heads: list[OperationRecord]) -> None:
        # A head's run may send its next op along when the trainer applies it right after
        # (an optim_step after a forward op): one trainer round per training step.
        ops = heads + [c for op in heads if (c := self._companion_of(op)) is not None]
        items = [BatchItem(op.name, op.run, op.kind, op.payload, op.num_tokens, Fence(op.seq_id, op.epoch),
                           SnapshotTarget(op.snapshot_path, op.tenant) if op.snapshot_path else None)
                 for op in ops]
        for op in ops:
            self._mark_running(op)
        self.batch_running = True
        self._count_batch(ops)
        try:
            outcomes, error = await _guard(self._trainer.run_batch(self.node_id, items), ops[0])
        finally:
            self.batch_running = False
        if error is not None:
            outcomes = [ItemOutcome(error=error)] * len(ops)
        elif len(outcomes) != len(ops):
            log.error("trainer %s answered %d outcomes for %d items", self.node_id,
                      len(outcomes), len(ops))
            error = OperationError(Code.INTERNAL, "BAD_BATCH_RESPONSE", "trainer answer malformed")
            outcomes = [ItemOutcome(error=error)] * len(ops)
        for op, item, outcome in zip(ops, items, outcomes, strict=True):
            self._on_done(op, dataclasses.replace(outcome, epoch=item.fence.epoch))

    def _count_batch(self, ops: list[OperationRecord]) -> None:
        tokens = sum(op.num_tokens for op in ops)
        self.batches_total += 1
        self.batch_items_total += len(ops)
        self.batch_tokens_total += tokens
        self._metrics.batch(self.node_id, len(ops), tokens)
        for op in ops:
            if op.num_tokens:
                self._metrics.tokens(op.tenant, op.kind.value, op.num_tokens)

    def _start_single(self, op: OperationRecord) -> None:
        self._mark_running(op)
        task = asyncio.get_running_loop().create_task(self._run_single(op))
        self._singles.add(task)
        task.add_done_callback(self._singles.discard)

    async def _run_single(self, op: OperationRecord) -> None:
        epoch = op.epoch
        result, error = await _guard(self._call_single(op), op)
        self._on_done(op, ItemOutcome(result=result, error=error, epoch=epoch))

    async def _call_single(self, op: OperationRecord) -> Any:
        if self._run_single_call is None:
            raise Unimplemented("UNSUPPORTED_KIND", f"no trainer call for {op.kind}")
        return await self._run_single_call(op)


async def _guard(
    call: Awaitable[Any], op: OperationRecord
) -> tuple[Any, OperationError | None]:
    """Await a port call and return (value, None) or (None, error). This is the batch
    boundary: anything unexpected is logged and reported as INTERNAL, never propagated."""
    try:
        return await call, None
    except TunemeshError as exc:
        log.warning("trainer call failed: %r", exc, extra={"operation": op.name, "run": op.run})
        return None, OperationError.of(exc)
    except Exception:
        log.exception("trainer call crashed", extra={"operation": op.name, "run": op.run})
        return None, OperationError(Code.INTERNAL, "TRAINER_ERROR", "trainer call failed")
