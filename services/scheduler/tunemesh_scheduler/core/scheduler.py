"""`SchedulerCore`: the facade the gRPC servicers call.

Every method takes the already-authenticated tenant id first. Resources of another
tenant read as NotFound. State lives in memory and is journaled to a `RunStore`
(sessions, runs, each run's operation log), from which a restarted scheduler recovers
(`recover`); durable placement lives behind `PlacementPort`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from tunemesh_common.errors import Code, FailedPrecondition, TunemeshError
from tunemesh_common.errors import ResourceExhausted, Unavailable
from tunemesh_common.metrics import SchedulerMetrics
from tunemesh_scheduler.core import idempotency
from tunemesh_scheduler.core.dispatch import NodeDispatcher
from tunemesh_scheduler.core.operations import OperationStore
from tunemesh_scheduler.core.failover import IN_DOUBT_REASONS, RunMover, SnapshotPolicy
from tunemesh_scheduler.core.journal import Journal
from tunemesh_scheduler.core.ports import (
    Fence, ItemOutcome, LoadRequest, LoadResult, PlacementPort, RunStore, StoreWrite, TrainerPort,
)
from tunemesh_scheduler.core.recovery import RecoveryPlan
from tunemesh_scheduler.core.records import (
    OperationError,
    OperationRecord,
    OpKind,
    OpState,
    RunRecord,
    SessionRecord,
)
from tunemesh_scheduler.core.runs import RunRegistry
from tunemesh_scheduler.core.sampling import SamplingSessionRegistry
from tunemesh_scheduler.core.sequencing import RunLane
from tunemesh_scheduler.core.sessions import SessionRegistry

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Tuning knobs of the core (a slice of the scheduler's settings)."""

    # Seconds queued ops wait for a missing earlier seq_id before failing with SEQ_ID_GAP.
    gap_timeout_s: float = 300.0
    # Most tokens in one fused batch (a single larger op still goes, alone).
    batch_token_budget: int = 16384
    # Merge window before each batch; 0 = dispatch as soon as the loop is free.
    batch_wait_s: float = 0.0
    # Most operations a run may have beyond its last finished seq_id (bounds memory).
    max_ops_ahead: int = 1024
    # Finished operations are forgotten this long after they end (GetOperation then
    # answers NOT_FOUND; a retry of their seq_id answers SEQ_ID_PASSED).
    finished_ttl_s: float = 3600.0
    # Most runs one tenant may hold, so no tenant can take every adapter slot; 0: none.
    max_runs_per_tenant: int = 0
    # Longest wait for the state store before a create answers UNAVAILABLE.
    store_timeout_s: float = 5.0
    # Longest wait for the state store before a training submit is acknowledged anyway
    # (a store outage must not stop training; the op log catches up when it is back).
    submit_store_wait_s: float = 2.0
    # A run is snapshot (weights + AdamW) after every this many optimizer steps; 0: never.
    snapshot_every_steps: int = 8
    # ... or when this many seconds passed since its last snapshot; 0: never.
    snapshot_every_s: float = 300.0
    # Wait before sending again an operation whose trainer could not be reached.
    unreachable_retry_s: float = 1.0
    # A session not heard from (heartbeat or create) this long ends; its runs freeze
    # (their adapter slots are released) once idle, and ResumeTrainingRun brings them
    # back. 0: sessions never expire.
    session_timeout_s: float = 600.0


def _new_uuid() -> str:
    return str(uuid.uuid4())


class SchedulerCore:
    """Sessions, runs and operations of all tenants; per-run order; fused batching."""

    def __init__(
        self,
        placement: PlacementPort,
        trainer: TrainerPort,
        config: SchedulerConfig = SchedulerConfig(),
        *,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = _new_uuid,
        metrics: SchedulerMetrics | None = None,
        store: RunStore | None = None,
    ) -> None:
        self._trainer = trainer
        self._config = config
        self._metrics = metrics or SchedulerMetrics()
        self.journal = Journal(store)  # None: state lives and dies with this process
        note = self.journal.note
        self.sessions = SessionRegistry(clock, new_id, note)
        self.runs = RunRegistry(placement, trainer, clock, new_id, config.max_runs_per_tenant, note)
        self.operations = OperationStore(clock, new_id, self._metrics, note)
        self.mover = RunMover(trainer, placement, store, note, clock,
                              SnapshotPolicy(config.snapshot_every_steps, config.snapshot_every_s))
        self.sampling = SamplingSessionRegistry(clock, new_id, note)
        self._lanes: dict[str, RunLane] = {}
        self._dispatchers: dict[str, NodeDispatcher] = {}
        self._serving = False
        self._clock = clock
        self._evictor: asyncio.Task | None = None

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Begin serving (call from the event loop that will run the core)."""
        self._serving = True
        self.journal.start()
        self._evictor = asyncio.get_running_loop().create_task(self._evict_periodically())

    async def _evict_periodically(self) -> None:
        config = self._config
        period = min(60.0, config.finished_ttl_s, config.session_timeout_s / 3 or 60.0, config.gap_timeout_s / 4)
        while True:
            await asyncio.sleep(max(0.05, period))
            self.tick()

    def tick(self, now: float | None = None) -> None:
        """Everything time decides: gap deadlines, expired sessions, forgotten operations."""
        now = self._clock() if now is None else now
        for lane in list(self._lanes.values()):
            lane.expire(now)
        self.evict_finished()
        self.sweep_sessions()

    def sweep_sessions(self) -> None:
        """End sessions past their heartbeat timeout; freeze the idle runs of ended ones."""
        if self._config.session_timeout_s:
            for record in self.sessions.expire(self._clock() - self._config.session_timeout_s):
                log.info("session %s expired (no heartbeat for %gs)", record.name, self._config.session_timeout_s,
                         extra={"tenant": record.tenant})
        ended = self.sessions.ended()
        for lane in self._lanes.values():
            run = lane.run
            if run.session in ended and run.node_id and lane.idle() and run.name not in self.mover.moving:
                self.mover.freeze(run)

    def evict_finished(self) -> int:
        """Forget operations finished more than `finished_ttl_s` ago; returns how many."""
        evicted = self.operations.evict_finished(self._clock() - self._config.finished_ttl_s)
        compacted = []
        for op in evicted:
            lane = self._lanes.get(op.run)
            if lane is not None:
                lane.forget(op)
                if op.seq_id <= lane.run.last_seq_id:
                    compacted.append(op)
        # The runs' floors (last_seq_id, step) are stored before their log shrinks.
        for run in {op.run: self._lanes[op.run].run for op in compacted}.values():
            run.floor = (run.last_seq_id, run.step)
            self.journal.note(StoreWrite(run))
        for op in compacted:
            self.journal.note(StoreWrite(op, delete=True))
        return len(evicted)

    async def stop(self) -> None:
        """Stop dispatching and write what the journal holds; every unfinished operation
        then fails with UNAVAILABLE here, but stays queued in the state store for the
        next scheduler (it is not journaled as failed)."""
        self._serving = False
        if self._evictor is not None:
            self._evictor.cancel()
        for dispatcher in self._dispatchers.values():
            await dispatcher.stop()
        self._dispatchers.clear()
        for lane in self._lanes.values():
            lane.close()
        await self.mover.stop()
        await self.journal.stop()
        error = OperationError(Code.UNAVAILABLE, "SCHEDULER_STOPPING", "scheduler stopped")
        for op in self.operations.unfinished():
            self.operations.fail(op, error)

    async def sync(self, timeout_s: float | None = None) -> None:
        """Wait until every change so far is in the state store; Unavailable
        (STORE_UNAVAILABLE) after `timeout_s` (default: the config's store timeout)."""
        await self.journal.synced(self.journal.latest,
                                  self._config.store_timeout_s if timeout_s is None else timeout_s)

    def recover(self, plan: RecoveryPlan) -> None:
        """Take over the sessions, runs and operations of a previous scheduler (before
        serving). Queued operations are dispatched again, with the runs' new epochs."""
        for session in plan.sessions:
            session.last_heartbeat_time = self._clock()  # clients get a full timeout to come back
            self.sessions.restore(session)
        for sampling in plan.sampling_sessions:
            self.sampling.restore(sampling)
        finished = sorted((op for r in plan.runs for op in r.finished), key=lambda o: (o.end_time or 0, o.name))
        for op in finished:  # by end time: the order eviction expects
            self.operations.restore(op)
        for recovered in plan.runs:
            self.runs.restore(recovered.run)
            self.journal.note(StoreWrite(recovered.run))  # its new epoch
            lane = self._add_lane(recovered.run)
            for op in recovered.queued:
                self.operations.restore(op)
            for op in recovered.finished + recovered.queued:
                lane.restore(op)
            lane.pump()
            for op in recovered.lost:
                self.journal.note(StoreWrite(op, delete=True))
        for op in plan.orphans:
            self.journal.note(StoreWrite(op, delete=True))

    # ---- sessions --------------------------------------------------------------------

    def create_session(self, tenant: str, labels: dict[str, str] | None = None) -> SessionRecord:
        return self.sessions.create(tenant, labels)

    def get_session(self, tenant: str, name: str) -> SessionRecord:
        return self.sessions.get(tenant, name)

    def heartbeat_session(self, tenant: str, name: str) -> SessionRecord:
        return self.sessions.heartbeat(tenant, name)

    def end_session(self, tenant: str, name: str) -> SessionRecord:
        record = self.sessions.end(tenant, name)
        self.sweep_sessions()  # its idle runs give their slots back now
        return record

    # ---- runs ------------------------------------------------------------------------

    async def create_run(
        self, tenant: str, session: str, base_model: str, lora: Any, request_id: str = "",
        restore: LoadRequest | None = None,
    ) -> RunRecord:
        """Place a new run and create its adapter, loaded from checkpoint `restore` if
        given; idempotent by (tenant, request_id)."""
        self._check_serving()
        self.sessions.get_open(tenant, session)

        async def load(record: RunRecord) -> None:
            record.origin = restore
            record.step = await self._trainer.load_adapter(record.node_id, record.name, tenant, restore)

        record = await self.runs.create(
            tenant, session, base_model, lora, request_id, load if restore else None, restore
        )
        self._add_lane(record)
        await self.sync()  # Unavailable while the store is down: a retry gets this run
        return record

    def restore_run(self, record: RunRecord) -> None:
        """Adopt a run known from durable metadata (its `last_seq_id` is kept)."""
        self.runs.restore(record)
        self._add_lane(record)

    def get_run(self, tenant: str, name: str) -> RunRecord:
        return self.runs.get(tenant, name)

    async def resume_run(self, tenant: str, name: str, session: str) -> RunRecord:
        """Attach the tenant's run to its open `session`; a frozen run is rebuilt on a
        trainer (its calls wait meanwhile)."""
        self._check_serving()
        self.sessions.get_open(tenant, session)
        record = self.runs.get(tenant, name)
        if record.session != session:
            record.session = session
            self.journal.note(StoreWrite(record))
        if not record.node_id:
            self._move(record)
        await self.sync()
        return record

    async def delete_run(self, tenant: str, name: str) -> None:
        """Delete an idle run and free its adapter slot (and the tenant's quota)."""
        self._check_serving()
        record = self.runs.get(tenant, name)
        lane = self._lanes[name]
        if not lane.idle():
            raise FailedPrecondition(
                "RUN_BUSY", f"{name} has unfinished operations: wait for them or cancel them first"
            )
        lane.close()
        del self._lanes[name]
        self.mover.forget(name)
        await self.runs.delete(record)

    def list_runs(
        self, tenant: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[RunRecord], str]:
        """A page of the tenant's runs and the next page token ('' at the end)."""
        return self.runs.list(tenant, page_size, page_token)

    # ---- operations ------------------------------------------------------------------

    async def submit(
        self,
        tenant: str,
        run: str,
        seq_id: int,
        request_id: str,
        kind: OpKind,
        payload: Any,
        payload_digest: bytes | str,
        num_tokens: int = 0,
    ) -> OperationRecord:
        """Queue one training call of a run; returns its operation (an earlier one on
        an idempotent retry). See `idempotency.check_call` / `find_duplicate` for the errors."""
        self._check_serving()
        record = self.runs.get(tenant, run)
        lane = self._lanes[run]
        kind = idempotency.check_call(seq_id, kind, num_tokens)
        existing = idempotency.find_duplicate(
            self.operations.find_request(tenant, request_id), lane, seq_id, request_id, kind, payload_digest
        )
        if existing is not None:
            self.operations.index_request(existing, request_id)
            return existing
        self.sessions.get_open(tenant, record.session)
        if seq_id > record.last_seq_id + self._config.max_ops_ahead:
            raise ResourceExhausted(  # retryable: the SDK backs off until earlier ops finish
                "TOO_MANY_QUEUED",
                f"seq_id {seq_id} is more than {self._config.max_ops_ahead} ahead of the run's "
                f"last finished seq_id {record.last_seq_id}",
            )
        op = self.operations.create(
            tenant=tenant, run=run, seq_id=seq_id, kind=kind, request_id=request_id,
            payload=payload, payload_digest=payload_digest, num_tokens=num_tokens,
            node_id=record.node_id, epoch=record.epoch,
        )
        lane.add(op)
        await self._logged(op)
        return op

    async def _logged(self, op: OperationRecord) -> None:
        """Wait (briefly) until the op is in the run's durable log; through a store
        outage it is acknowledged anyway and logged once the store is back."""
        if not self.journal.store_up:  # known down: no wait per call
            return
        try:
            await self.sync(self._config.submit_store_wait_s)
        except Unavailable:
            log.warning("acknowledging %s before the state store confirmed it", op.name,
                        extra={"run": op.run, "operation": op.name})

    def get_operation(self, tenant: str, name: str) -> OperationRecord:
        return self.operations.get(tenant, name)

    async def wait_operation(self, tenant: str, name: str, timeout_s: float) -> OperationRecord:
        """Long-poll: return once the operation is done or `timeout_s` passed."""
        op = self.operations.get(tenant, name)
        return await self.operations.wait(op, timeout_s)

    def cancel_operation(self, tenant: str, name: str) -> OperationRecord:
        """Best-effort cancel: a QUEUED op becomes CANCELLED (later seq_ids of its run
        proceed); a RUNNING or done op is returned unchanged."""
        op = self.operations.get(tenant, name)
        if op.state is not OpState.QUEUED:
            return op
        lane = self._lanes[op.run]
        if op is lane.head and not self._dispatchers[op.node_id].discard(op):
            return op
        self.operations.cancel(op)
        lane.on_done(op)
        return op

    # ---- status ----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Cheap plain-dict status for `tunemesh status` and metrics."""
        ops = self.operations
        return {
            "serving": self._serving,
            "sessions_open": self.sessions.count_open(),
            "runs": len(self.runs),
            "operations_total": len(ops),
            "operations_by_state": dict(+ops.by_state),
            "queued_by_tenant": dict(ops.queued_by_tenant),  # every tenant that ever queued, 0 when idle
            "queued_by_node": dict(+ops.queued_by_node),
            "nodes": {node: d.snapshot() for node, d in self._dispatchers.items()},
        }

    # ---- internals -------------------------------------------------------------------

    def _check_serving(self) -> None:
        if not self._serving:
            raise Unavailable("NOT_SERVING", "scheduler is not serving")

    def _add_lane(self, record: RunRecord) -> RunLane:
        if record.name not in self._lanes:
            self._lanes[record.name] = RunLane(
                record, self._config.gap_timeout_s, self._release, self._fail_gap, self._clock
            )
        return self._lanes[record.name]

    def _dispatcher(self, node_id: str) -> NodeDispatcher:
        dispatcher = self._dispatchers.get(node_id)
        if dispatcher is None:
            dispatcher = self._dispatchers[node_id] = NodeDispatcher(
                node_id, self._trainer, self.operations.mark_running, self._finish,
                self._config.batch_token_budget, self._config.batch_wait_s, self._companion_of,
                self._run_single, self._metrics,
            )
            dispatcher.start()
        return dispatcher

    def _companion_of(self, op: OperationRecord) -> OperationRecord | None:
        """The run's optim_step right after forward op `op`, if already queued: the trainer
        applies a batch's optimizer items after its fused pass, so it can ride along."""
        if op.kind is OpKind.OPTIM_STEP or op.run in self.mover.moving:
            return None
        lane = self._lanes[op.run]
        nxt = lane.find(op.seq_id + 1)
        if nxt is not None and nxt.kind is OpKind.OPTIM_STEP and nxt.state is OpState.QUEUED:
            self.mover.mark_snapshot(lane.run, nxt)
            return nxt
        return None

    async def _run_single(self, op: OperationRecord) -> Any:
        """A checkpoint save or load of one run (ordered like its other operations)."""
        fence = Fence(op.seq_id, op.epoch)
        if op.kind is OpKind.LOAD_STATE:
            step = await self._trainer.load_adapter(op.node_id, op.run, op.tenant, op.payload, fence)
            return LoadResult(op.payload.path, step)
        return await self._trainer.save_adapter(op.node_id, op.run, op.tenant, op.payload, fence)

    def _release(self, op: OperationRecord) -> None:
        if op.run in self.mover.moving:
            return  # the move releases the run's head on its new node
        run = self._lanes[op.run].run
        if not run.node_id:  # frozen: rebuilt first, then the move releases the head
            self._move(run)
            return
        self.mover.mark_snapshot(run, op)
        self._dispatcher(op.node_id).enqueue(op)

    # ---- trainers that fail ----------------------------------------------------------

    def node_lost(self, node_id: str) -> None:
        """Trainer `node_id` left (its lease lapsed): move every run it held."""
        for lane in list(self._lanes.values()):
            if lane.run.node_id == node_id:
                self._move(lane.run)

    def node_joined(self, node_id: str) -> None:
        """Trainer `node_id` (re)joined: free the adapters it still holds of runs that
        moved away from it meanwhile (it was paused or cut off past its lease)."""
        if self.mover.enabled:
            self.mover.spawn(self._free_moved_away(node_id))

    async def _free_moved_away(self, node_id: str) -> None:
        try:
            held = await self._trainer.list_adapters(node_id)
        except TunemeshError as exc:
            log.info("could not list the adapters of %s: %s", node_id, exc)
            return
        for adapter in held:
            lane = self._lanes.get(adapter)
            if lane is None or lane.run.node_id == node_id or adapter in self.mover.moving:
                continue  # unknown ones are freed when a scheduler starts
            try:
                await self._trainer.delete_adapter(node_id, adapter)
                log.info("freed %s on %s: the run moved to %s", adapter, node_id, lane.run.node_id)
            except TunemeshError as exc:
                log.info("could not free %s on %s: %s", adapter, node_id, exc)

    def relocate(self, run_name: str) -> None:
        """Rebuild a run whose trainer lost its adapter, from its snapshot and log."""
        lane = self._lanes.get(run_name)
        if lane is not None:
            self._move(lane.run)

    def _move(self, run: RunRecord) -> None:
        if self.mover.enabled and run.name in self._lanes:
            lane = self._lanes[run.name]
            self.mover.move(run, lambda: lane.history(), self._moved)

    def _moved(self, run: RunRecord) -> None:
        """`run` serves again on its new node: its waiting operations go there."""
        lane = self._lanes.get(run.name)
        if lane is None:
            return
        for op in lane.unfinished():
            old = self._dispatchers.get(op.node_id)
            if old is not None and op.node_id != run.node_id:
                old.discard(op)  # still waiting for the node it left
            self.operations.reassign(op, run.node_id, run.epoch)
        if lane.head is not None and lane.head.state is OpState.QUEUED:
            self._release(lane.head)

    def _park(self, op: OperationRecord, why: OperationError) -> None:
        """The op did not certainly apply where it went (trainer unreachable, adapter
        lost, run moving): it goes out again, never fails for it. The trainer applies a
        (run, seq_id) once, so a call that did apply is answered from its record."""
        log.info("sending %s again later: %s", op.name, why.message, extra={"run": op.run, "operation": op.name})
        self.operations.requeue(op)
        run = self._lanes[op.run].run
        if why.reason == "ADAPTER_NOT_FOUND" and self.mover.enabled:
            self._move(run)
        elif op.run not in self.mover.moving:
            asyncio.get_running_loop().call_later(self._config.unreachable_retry_s, self._release_again, op)

    def _release_again(self, op: OperationRecord) -> None:
        lane = self._lanes.get(op.run)
        if lane is not None and op is lane.head and op.state is OpState.QUEUED:
            self._release(op)

    def _finish(self, op: OperationRecord, outcome: ItemOutcome) -> None:
        if op.done:
            return
        parked = _in_doubt(outcome.error) if self.mover.enabled else None
        if op.run in self.mover.moving or op.epoch != outcome.epoch:
            parked = OperationError(Code.UNAVAILABLE, "RUN_MOVED", "the run moved while the call was out")
        if parked is not None and op.run in self._lanes:
            self._park(op, parked)
            return
        if outcome.error is not None:
            self.operations.fail(op, outcome.error)
        else:
            self.operations.succeed(op, outcome.result)
            if op.kind is OpKind.OPTIM_STEP:
                self._lanes[op.run].run.step += 1
            elif op.kind is OpKind.LOAD_STATE:
                self._lanes[op.run].run.step = outcome.result.step
        self.mover.on_finished(self._lanes[op.run].run, op)
        self._lanes[op.run].on_done(op)

    def _fail_gap(self, lane: RunLane, waiting: list[OperationRecord]) -> None:
        log.warning("seq_id %d never arrived; failing %d ops", lane.next_seq_id, len(waiting),
                    extra={"run": lane.run.name})
        error = OperationError(
            Code.FAILED_PRECONDITION, "SEQ_ID_GAP",
            f"seq_id {lane.next_seq_id} of {lane.run.name} did not arrive within "
            f"{self._config.gap_timeout_s:g}s",
        )
        for op in waiting:
            self.operations.fail(op, error)
        lane.pump()


def _in_doubt(error: OperationError | None) -> OperationError | None:
    """`error` when it does not say the call certainly failed where it was applied."""
    if error is not None and error.reason in IN_DOUBT_REASONS:
        return error
    return None
