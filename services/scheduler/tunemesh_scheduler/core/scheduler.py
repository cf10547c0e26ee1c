"""`SchedulerCore`: the facade the gRPC servicers call, and the driver of the machine.

Every method takes the already-authenticated tenant id first. Resources of another
tenant read as NotFoundError. What the scheduler decides lives in `SchedulerMachine` (pure:
no task, timer or socket); this class is the thin asyncio layer around it: it runs the
requests that need I/O (placing a run, creating its adapter), executes the machine's
actions (trainer batches, checkpoint calls, moves, freezes, snapshot confirmations) as
tasks, feeds their outcomes back, and wakes the machine when time decides something.
State is journaled to a `RunStore` (sessions, runs, each run's operation log), from
which a restarted scheduler recovers (`recover`); durable placement lives behind
`PlacementPort`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

from tunemesh.errors import Code, FailedPreconditionError, NotFoundError, TunemeshError
from tunemesh.errors import ResourceExhaustedError, UnavailableError
from tunemesh_scheduler.metrics import SchedulerMetrics
from tunemesh_scheduler.core import idempotency
from tunemesh_scheduler.core.completions import CompletionFeed, CompletionLog, WatchBatch
from tunemesh_scheduler.core.failover import FailoverCalls
from tunemesh_scheduler.core.journal import Journal
from tunemesh_scheduler.core.actions import Action, Batch, ConfirmSnapshot, Freeze, FreeMovedAway, Move, Single
from tunemesh_scheduler.core.machine import SchedulerMachine
from tunemesh_scheduler.core.snapshots import SnapshotPolicy
from tunemesh_scheduler.core.operations import OperationStore
from tunemesh_scheduler.core.ports import (
    Fence, ItemOutcome, LoadResult, PlacementPort, RunStore, StoreWrite, TrainerPort,
)
from tunemesh_scheduler.core.recovery import RecoveryPlan
from tunemesh_scheduler.core.release import ReleaseGate, remaining
from tunemesh_scheduler.core.records import (
    OperationError,
    OperationRecord,
    OpKind,
    RunRecord,
    SessionRecord,
)
from tunemesh_scheduler.core.runs import RunRegistry
from tunemesh_scheduler.core.sampling import (
    CheckpointLookup, SamplerRoutes, SamplingSessionRecord, SamplingSessionRegistry, sampling_source,
)
from tunemesh_scheduler.core.sessions import SessionRegistry
from tunemesh_scheduler.core.work import LoadRequest, SaveRequest, Work

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Tuning knobs of the core (a slice of the scheduler's settings)."""

    # Seconds queued ops wait for a missing earlier seq_id before failing with SEQ_ID_GAP.
    gap_timeout_s: float = 300.0
    # Most tokens in one fused batch (a single larger op still goes, alone).
    batch_token_budget: int = 16384
    # Merge window before each batch; 0 = dispatch as soon as the loop is free.
    batch_wait_s: float = 0.0
    merge_wait_s: float = 0.0  # see SchedulerMachine._window_end
    # A tenant whose operation ended on a node this recently still counts as active there:
    # another tenant's flood gets one fair quantum per batch meanwhile (core/fairness.py).
    fair_share_grace_s: float = 0.1
    # Most operations a run may have beyond its last finished seq_id (bounds memory).
    max_ops_ahead: int = 1024
    # Finished operations are forgotten this long after they end (GetOperation then
    # answers NOT_FOUND; a retry of their seq_id answers SEQ_ID_PASSED).
    finished_ttl_s: float = 3600.0
    # Most operations / tokens one tenant may have queued (not yet sent to a trainer), so
    # no tenant can fill the scheduler's memory; 0: no cap. Over it: TENANT_QUEUE_FULL.
    max_queued_ops_per_tenant: int = 0
    max_queued_tokens_per_tenant: int = 0
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
    # ... but not sooner than this many seconds after its last one: fast steps (a small
    # model) are not snapshot many times a second; a move then replays at most about
    # this long of the run's work (or `snapshot_every_steps` steps, if more). The
    # service's setting defaults to 2 s.
    snapshot_min_interval_s: float = 0.0
    # ... or before the trainer rounds that carried its work since its last snapshot pass
    # this many seconds (what a move would replay: bounds a trainer death's recompute on
    # slow models, where 8 steps take long); 0: never by work.
    snapshot_replay_budget_s: float = 0.0
    # A trainer receiving moved runs sends no round while it rebuilds their adapters (each
    # reads its snapshot first, 68 MB on SmolLM2), for up to this long after the latest
    # rebuild began or the round in progress (which a rebuild waits for) ended, so the
    # moved runs go before the trainer's own.
    restore_hold_s: float = 5.0
    # A run moved while its client waited goes out in a round of its own, the one fewest
    # calls from its answer first (see `SchedulerMachine._first_back`); False: fused.
    recover_alone: bool = True
    # A change nobody waits on yet waits at most this long for others to share its write
    # to the state store; one somebody waits on (a create, an operation sent to its
    # trainer, whose result waits for its submission) goes at once.
    journal_linger_s: float = 0.02
    # A deferrable change (a finish, an eviction) waits at most this long for another to ride with.
    journal_defer_s: float = 0.05
    # Wait before sending again an operation whose trainer could not be reached.
    unreachable_retry_s: float = 1.0
    # A session not heard from (heartbeat or create) this long ends; its runs freeze
    # (their adapter slots are released) once idle, and ResumeTrainingRun brings them
    # back. 0: sessions never expire.
    session_timeout_s: float = 600.0


def _new_uuid() -> str:
    return str(uuid.uuid4())


class SchedulerCore:
    """Sessions, runs and operations of all tenants; drives the `SchedulerMachine`."""

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
        move_retry_s: float = 2.0,
    ) -> None:
        self._trainer = trainer
        self._config = config
        self._metrics = metrics or SchedulerMetrics()
        self.journal = Journal(store, linger_s=config.journal_linger_s, defer_s=config.journal_defer_s)  # None: state lives and dies with this process
        note = self.journal.note
        self.sessions = SessionRegistry(clock, new_id, note)
        self.runs = RunRegistry(placement, trainer, clock, new_id, config.max_runs_per_tenant, note)
        # Numbers finished operations for WatchOperations; its epoch names this incarnation.
        self.completions: CompletionFeed[OperationRecord] = CompletionFeed(CompletionLog(_new_uuid()))
        # What clients see of finished operations: only those whose submission is stored.
        self.release = ReleaseGate(self.journal, lambda op: self.completions.record(op.tenant, op))
        self.operations = OperationStore(clock, new_id, self._metrics, note, on_finish=self.release.finished,
                                         held=lambda op: not self.release.stored(op))
        self.sampling = SamplingSessionRegistry(clock, new_id, note)
        self.machine = SchedulerMachine(
            self.operations, self.sessions, clock=clock, note=note,
            gap_timeout_s=config.gap_timeout_s, batch_token_budget=config.batch_token_budget,
            batch_wait_s=config.batch_wait_s, merge_wait_s=config.merge_wait_s,
            fair_share_grace_s=config.fair_share_grace_s,
            unreachable_retry_s=config.unreachable_retry_s,
            move_retry_s=move_retry_s, restore_hold_s=config.restore_hold_s,
            recover_alone=config.recover_alone,
            session_timeout_s=config.session_timeout_s,
            finished_ttl_s=config.finished_ttl_s,
            snapshots=SnapshotPolicy(config.snapshot_every_steps, config.snapshot_every_s,
                                     config.snapshot_min_interval_s, config.snapshot_replay_budget_s),
            movable=store is not None, metrics=self._metrics,
        )
        self._calls = FailoverCalls(trainer, placement, store)
        self._serving = False
        self._clock = clock
        self._wake = asyncio.Event()
        self._driver: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # the machine's actions being executed

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Begin serving (call from the event loop that will run the core)."""
        self._serving = True
        self.journal.start()
        self._driver = asyncio.get_running_loop().create_task(self._drive(), name="scheduler-driver")

    def _tick_period(self) -> float:
        config = self._config
        return max(0.05, min(60.0, config.finished_ttl_s, config.session_timeout_s / 3 or 60.0,
                             config.gap_timeout_s / 4))

    async def _drive(self) -> None:
        """Execute the machine's actions as they come; tick it periodically."""
        period = self._tick_period()
        next_tick = self._clock() + period
        while True:
            self._wake.clear()  # before asking: a change made from here on wakes the loop again
            now = self._clock()
            if now >= next_tick:
                self.machine.tick(now)
                next_tick = now + period
            try:
                actions = self.machine.next_actions(now)
            except Exception:  # a bug must not stop all dispatching for good
                log.exception("the scheduler machine failed to plan")
                actions = []
            for action in actions:
                self._spawn(self._execute(action))
            deadline = min(self.machine.next_deadline() or next_tick, next_tick)
            try:
                async with asyncio.timeout(min(period, max(0.0, deadline - self._clock()))):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _poke(self) -> None:
        """The machine changed: let the driver look at it."""
        self._wake.set()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, action: Action) -> None:
        try:
            if isinstance(action, (Batch, Single)):  # its results wait for its submissions: write them meanwhile
                self.journal.urge(max(op.ticket for op in (action.ops if isinstance(action, Batch) else [action.op])))
            if isinstance(action, Batch):
                outcomes, error = await _guard(self._trainer.run_batch(action.node_id, action.items), action.ops[0])
                self.machine.complete_batch(action, outcomes, error)
            elif isinstance(action, Single):
                epoch = action.op.epoch
                result, error = await _guard(self._run_single(action.op), action.op)
                self.machine.complete_single(action, ItemOutcome(result=result, error=error, epoch=epoch))
            elif isinstance(action, Move):
                await self._move(action)
            elif isinstance(action, Freeze):
                await self._calls.freeze(action)
                self.machine.frozen(action)
            elif isinstance(action, ConfirmSnapshot):
                await self._confirm(action)
            elif isinstance(action, FreeMovedAway):
                await self._calls.free_moved_away(action.node_id, self.machine.moved_away)
        except Exception:
            log.exception("executing %s failed", type(action).__name__)
        finally:
            self._poke()

    async def _move(self, action: Move) -> None:
        try:
            node, epoch, replay, started_from = await self._calls.move(
                action, lambda node: self._restoring(action, node))
        except Exception as exc:  # TunemeshError expected; anything else must not wedge the run
            level = logging.WARNING if isinstance(exc, TunemeshError) else logging.ERROR
            log.log(level, "moving %s failed (%r); trying again", action.run.name, exc, extra={"run": action.run.name})
            self.machine.move_failed(action)
            return
        for path in self.machine.moved(action, node, epoch, replay, started_from):
            await self._calls.delete_snapshot(action.run, path)

    def _restoring(self, action: Move, node: str) -> None:
        self.machine.restoring(action, node)
        self._poke()  # the node's hold has a deadline

    async def _confirm(self, action: ConfirmSnapshot) -> None:
        try:
            await self._calls.confirm(action)
        except TunemeshError as exc:
            log.warning("snapshot after %s of %s failed: %s", action.op.seq_id, action.run.name, exc,
                        extra={"run": action.run.name})
            self.machine.snapshot_failed(action)
            return
        superseded = self.machine.snapshot_written(action)
        if superseded:
            await self._calls.delete_snapshot(action.run, superseded)

    async def _run_single(self, op: OperationRecord) -> Any:
        """A checkpoint save or load of one run (ordered like its other operations)."""
        fence = Fence(op.seq_id, op.epoch)
        match op.payload:
            case LoadRequest() as load:
                step = await self._trainer.load_adapter(op.node_id, op.run, op.tenant, load, fence)
                return LoadResult(load.path, step)
            case SaveRequest() as save:
                return await self._trainer.save_adapter(op.node_id, op.run, op.tenant, save, fence)
        raise TypeError(f"{op.name}: {op.kind.name} is not a checkpoint call")

    def tick(self, now: float | None = None) -> None:
        """Everything time decides: gap deadlines, expired sessions, forgotten operations."""
        self.machine.tick(self._clock() if now is None else now)
        self._poke()

    def evict_finished(self) -> int:
        """Forget operations finished more than `finished_ttl_s` ago; returns how many."""
        return self.machine.evict_finished(self._clock())

    async def stop(self) -> None:
        """Stop dispatching and write what the journal holds; every unfinished operation
        then fails with UNAVAILABLE here, but stays queued in the state store for the
        next scheduler (it is not journaled as failed)."""
        self._serving = False
        tasks = [t for t in (self._driver, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for lane in self.machine.lanes.values():
            lane.close()
        await self.journal.stop()
        error = OperationError(Code.UNAVAILABLE, "SCHEDULER_STOPPING", "scheduler stopped")
        for op in self.operations.unfinished():
            self.operations.fail(op, error)

    async def sync(self, timeout_s: float | None = None) -> None:
        """Wait until every change so far is in the state store; UnavailableError
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
        for recovered in plan.runs:
            recovered.run.last_request_time = max(
                (op.create_time for op in (*recovered.finished, *recovered.queued, *recovered.lost)), default=0.0)
            self.runs.restore(recovered.run)
        self.machine.restore(plan)
        self._poke()

    # ---- sessions --------------------------------------------------------------------

    async def create_sampling_session(self, tenant: str, session: str, base_model: str, model_path: str,
                                      checkpoints: CheckpointLookup, samplers: SamplerRoutes) -> SamplingSessionRecord:
        """A sampling session of the tenant's open `session`, on a base model or one of the
        tenant's checkpoints, routed to a sampler serving it; durable before it returns."""
        self.sessions.get_open(tenant, session)
        base_model, path, key = await sampling_source(tenant, base_model, model_path, checkpoints)
        samplers.model(base_model)  # NotFoundError(UNKNOWN_MODEL) when no sampler serves it
        record = self.sampling.create(tenant, session, base_model, path, key, samplers.route(base_model, key))
        await self.sync()
        return record

    def get_sampling_session(self, tenant: str, name: str) -> SamplingSessionRecord:
        """The tenant's sampling session while its client session is open: an ended
        session's sampling sessions answer SESSION_ENDED, as its runs do."""
        record = self.sampling.get(tenant, name)
        self.sessions.get_open(tenant, record.session)
        return record

    def create_session(self, tenant: str, labels: dict[str, str] | None = None) -> SessionRecord:
        return self.sessions.create(tenant, labels)

    def get_session(self, tenant: str, name: str) -> SessionRecord:
        return self.sessions.get(tenant, name)

    def heartbeat_session(self, tenant: str, name: str) -> SessionRecord:
        return self.sessions.heartbeat(tenant, name)

    def end_session(self, tenant: str, name: str) -> SessionRecord:
        record = self.sessions.end(tenant, name)
        self.machine.sweep_sessions(self._clock())  # its idle runs give their slots back now
        self._poke()
        return record

    def sweep_sessions(self) -> None:
        """End sessions past their heartbeat timeout; freeze the idle runs of ended ones."""
        self.machine.sweep_sessions(self._clock())
        self._poke()

    # ---- runs ------------------------------------------------------------------------

    async def create_run(
        self, tenant: str, session: str, base_model: str, lora: Any, request_id: str = "",
        restore: LoadRequest | None = None, user_metadata: tuple[tuple[str, str], ...] = (),
    ) -> RunRecord:
        """Place a new run and create its adapter, loaded from checkpoint `restore` if
        given; idempotent by (tenant, request_id). `user_metadata`: the caller's sorted
        (key, value) notes, kept with the run."""
        self._check_serving()
        self.sessions.get_open(tenant, session)

        async def load(record: RunRecord) -> None:
            record.origin = restore
            record.step = await self._trainer.load_adapter(record.node_id, record.name, tenant, restore)

        record = await self.runs.create(
            tenant, session, base_model, lora, request_id, load if restore else None, restore, user_metadata
        )
        self.machine.add_run(record)
        await self.sync()  # UnavailableError while the store is down: a retry gets this run
        return record

    def restore_run(self, record: RunRecord) -> None:
        """Adopt a run known from durable metadata (its `last_seq_id` is kept)."""
        self.runs.restore(record)
        self.machine.add_run(record)

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
            self.machine.relocate(name)
            self._poke()
        await self.sync()
        return record

    async def delete_run(self, tenant: str, name: str) -> None:
        """Delete an idle run, free its adapter slot (and the tenant's quota) and delete
        its automatic snapshot (one still being written is deleted once written)."""
        self._check_serving()
        record = self.runs.get(tenant, name)
        if not self.machine.lanes[name].idle() or name in self.machine.moving:
            raise FailedPreconditionError(
                "RUN_BUSY", f"{name} has unfinished operations: wait for them or cancel them first"
            )
        self.machine.remove_run(name)
        await self.runs.delete(record)
        if record.snapshot_path:  # internal: nobody else deletes it
            await self._calls.delete_snapshot(record, record.snapshot_path)

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
        payload: Work,
        payload_digest: bytes | str,
        num_tokens: int = 0,
        ack_when_queued: bool = False,
    ) -> OperationRecord:
        """Queue one training call of a run; returns its operation (an earlier one on
        an idempotent retry). See `idempotency.check_call` / `find_duplicate` for the errors.
        Returns once the call is stored, or at once with `ack_when_queued` (the client
        re-sends it if it is lost: the journal writes it within its linger)."""
        self._check_serving()
        record = self.runs.get(tenant, run)
        lane = self.machine.lanes[run]
        kind = idempotency.check_call(seq_id, kind, num_tokens)
        existing = idempotency.find_duplicate(
            self.operations.find_request(tenant, request_id), lane, seq_id, request_id, kind, payload_digest
        )
        if existing is not None:
            self.operations.index_request(existing, request_id)
            return self.release.view(existing)
        self.sessions.get_open(tenant, record.session)
        if seq_id > record.last_seq_id + self._config.max_ops_ahead:
            raise ResourceExhaustedError(  # retryable: the SDK backs off until earlier ops finish
                "TOO_MANY_QUEUED",
                f"seq_id {seq_id} is more than {self._config.max_ops_ahead} ahead of the run's "
                f"last finished seq_id {record.last_seq_id}",
            )
        self.operations.check_tenant_room(tenant, num_tokens, self._config.max_queued_ops_per_tenant,
                                          self._config.max_queued_tokens_per_tenant)
        op = self.operations.create(
            tenant=tenant, run=run, seq_id=seq_id, kind=kind, request_id=request_id,
            payload=payload, payload_digest=payload_digest, num_tokens=num_tokens,
            node_id=record.node_id, epoch=record.epoch,
        )
        record.last_request_time = op.create_time
        self.machine.submit(op)
        self._poke()
        if not ack_when_queued:
            await self._logged(op)
        return self.release.view(op)

    async def _logged(self, op: OperationRecord) -> None:
        """Wait (briefly) until the op is in the run's durable log; through a store
        outage it is acknowledged anyway and logged once the store is back."""
        if not self.journal.store_up:  # known down: no wait per call
            return
        try:
            await self.sync(self._config.submit_store_wait_s)
        except UnavailableError:
            log.warning("acknowledging %s before the state store confirmed it", op.name,
                        extra={"run": op.run, "operation": op.name})

    def get_operation(self, tenant: str, name: str) -> OperationRecord:
        return self.release.view(self.operations.get(tenant, name))

    async def wait_operation(self, tenant: str, name: str, timeout_s: float) -> OperationRecord:
        """Long-poll: return once the operation is done (and its submission stored: see
        core/release.py) or `timeout_s` passed."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        op = await self.operations.wait(self.operations.get(tenant, name), timeout_s)
        return await self.release.wait_stored(op, remaining(deadline))

    async def watch_operations(
        self, tenant: str, epoch: str, cursor: int, names: list[str], heartbeat_s: float
    ) -> AsyncIterator[WatchBatch[OperationRecord]]:
        """The tenant's completions after `cursor` of `epoch` (first, with those of `names`
        already done and the `names` not held), then each new completion as it happens,
        or a heartbeat every `heartbeat_s` seconds (see core/completions.py)."""
        replay = self.completions.log.replay(tenant, epoch, cursor)
        named, missing = [], []
        for name in names:
            try:
                op = self.operations.get(tenant, name)
            except NotFoundError:
                missing.append(name)
                continue
            if op.done and self.release.stored(op):
                named.append(op)
        yield WatchBatch(replay.epoch, replay.cursor, named + replay.items, replay.cursor_lost, missing)
        position = replay.cursor
        while True:
            await self.completions.wait_past(tenant, position, heartbeat_s)
            replay = self.completions.log.replay(tenant, replay.epoch, position)
            yield WatchBatch(replay.epoch, replay.cursor, replay.items, replay.cursor_lost)
            position = replay.cursor

    def cancel_operation(self, tenant: str, name: str) -> OperationRecord:
        """Best-effort cancel: a QUEUED op that has not gone out becomes CANCELLED (later
        seq_ids of its run proceed); a RUNNING, in-doubt or done op is returned unchanged."""
        op = self.operations.get(tenant, name)
        if self.machine.cancel(op):
            self._poke()
        return self.release.view(op)

    # ---- trainers that fail ----------------------------------------------------------

    def node_lost(self, node_id: str) -> None:
        """Trainer `node_id` left (its lease lapsed): move every run it held."""
        self.machine.node_lost(node_id)
        self._poke()

    def node_joined(self, node_id: str, models: Collection[str] = ()) -> None:
        """Trainer `node_id` (re)joined, serving `models`: free the adapters it still holds
        of runs that moved away from it meanwhile (it was paused or cut off past its lease)
        and move runs of its models to it from trainers holding two or more runs more."""
        self.machine.node_joined(node_id, models)
        self._poke()

    def relocate(self, run_name: str) -> None:
        """Rebuild a run whose trainer lost its adapter, from its snapshot and log."""
        self.machine.relocate(run_name)
        self._poke()

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
            "nodes": self.machine.node_status(),
        }

    def _check_serving(self) -> None:
        if not self._serving:
            raise UnavailableError("NOT_SERVING", "scheduler is not serving")


async def _guard(call: Awaitable[Any], op: OperationRecord) -> tuple[Any, OperationError | None]:
    """Await a port call and return (value, None) or (None, error). This is the trainer
    boundary: anything unexpected is logged and reported as INTERNAL, never propagated."""
    try:
        return await call, None
    except TunemeshError as exc:
        log.warning("trainer call failed: %r", exc, extra={"operation": op.name, "run": op.run})
        return None, OperationError.of(exc)
    except Exception:
        log.exception("trainer call crashed", extra={"operation": op.name, "run": op.run})
        return None, OperationError(Code.INTERNAL, "TRAINER_ERROR", "trainer call failed")
