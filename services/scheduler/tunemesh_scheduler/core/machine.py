"""The scheduler's decisions as a pure state machine.

The shape is vLLM v1's engine core (`schedule -> execute -> update_from_output`):
`submit` queues a run's operation, `next_actions(now)` says what to send (one fused
batch per free trainer node, single checkpoint calls, run moves, freezes, snapshot
confirmations), the `complete_*` / `moved` / `*_failed` methods feed the answers back,
and `tick(now)` applies what time decides (gap deadlines, expired sessions, forgotten
operations). The machine owns no task, timer or socket, and never awaits: the asyncio
driver (`SchedulerCore`) executes the actions and reports how they ended, so every
interleaving of submits, answers, failures, moves and leader changes is a sequence of
plain calls in a unit test.

Rules it keeps:
- A run's operations go out one at a time in seq_id order (`RunLane`); a node has at
  most one batch out; a batch holds at most one operation per run, plus the run's next
  OPTIM_STEP when it is already queued (the trainer applies it after the fused pass).
- An answer that does not say the call certainly failed where it went (trainer
  unreachable, adapter lost, the run moved or its epoch changed while the call was out)
  parks the operation: it goes out again after `unreachable_retry_s`, never fails for
  it. The trainer applies a (run, seq_id) once, so a repeat is answered from its record.
- A run being moved or frozen sends nothing; when the move ends its waiting operations
  go to the new node with the new epoch.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Collection
from typing import Any

from tunemesh.errors import Code
from tunemesh_scheduler.metrics import SchedulerMetrics
from tunemesh_scheduler.core.actions import Action, Batch, ConfirmSnapshot, Freeze, FreeMovedAway, Move, Single
from tunemesh_scheduler.core.fairness import FairQueue
from tunemesh_scheduler.core.operations import OperationStore
from tunemesh_scheduler.core.ports import BatchItem, Fence, ItemOutcome, SnapshotTarget, StoreWrite
from tunemesh_scheduler.core.recovery import RecoveryPlan
from tunemesh_scheduler.core.records import (
    BATCHABLE_KINDS, STATEFUL_KINDS, OperationError, OperationRecord, OpKind, OpState, RunRecord,
)
from tunemesh_scheduler.core.sequencing import RunLane
from tunemesh_scheduler.core.sessions import SessionRegistry
from tunemesh_scheduler.core.snapshots import SnapshotBook, SnapshotPolicy
from tunemesh_scheduler.core.work import Work

log = logging.getLogger(__name__)

# Errors that do not say a call certainly failed where it went: sent again, never final.
IN_DOUBT_REASONS = frozenset({"TRAINER_UNAVAILABLE", "TRAINER_GONE", "ADAPTER_NOT_FOUND"})
# The trainer applied the call so long ago that it no longer keeps its outcome: a scheduler
# that took over with the call's finish unstored (its result may have reached the client)
# sends it again. Rebuilding the adapter from a snapshot before the call and replaying
# recomputes that outcome, bit for bit; failing the call would contradict what was shown.
FORGOTTEN_REASON = "SEQ_ID_APPLIED"
# Reasons that move the run (its adapter is gone, or its state is past what is known)
MOVE_REASONS = frozenset({"ADAPTER_NOT_FOUND", FORGOTTEN_REASON})
# A free node's next round waits for the runs of its last one at most this share of that
# round's time (and at most `merge_wait_s`): ~1 % of a round's throughput at worst.
MERGE_WAIT_SHARE = 0.1


@dataclasses.dataclass
class _Node:
    """Dispatch state of one trainer node."""

    ready: FairQueue = dataclasses.field(default_factory=FairQueue)
    ready_since: float | None = None  # when the merge window of the next batch opened
    backlog: bool = False  # ops were left over from the last batch: no merge window
    in_flight: Batch | None = None
    served: dict[str, float] = dataclasses.field(default_factory=dict)  # tenant -> when its last op here ended
    singles_running: int = 0
    restoring: set[str] = dataclasses.field(default_factory=set)  # runs whose adapter is being rebuilt here
    held_until: float = 0.0  # while runs are restoring, no round goes out before this
    last_runs: frozenset[str] = frozenset()  # the runs of the last round answered here
    last_round_s: float = 0.0  # how long that round took
    batches_total: int = 0
    batch_items_total: int = 0
    batch_tokens_total: int = 0


@dataclasses.dataclass(eq=False)
class _Replay:
    """A moved run's calls after its snapshot, sent again on its new node in seq_id
    order (each as a stand-in operation), before its waiting operations go there."""

    move: Move
    calls: collections.deque  # (original operation, its call), not yet sent
    out: int = 0  # stand-ins sent and not yet answered
    sent: int = 0  # stand-ins made, in all


class SchedulerMachine:
    """Per-run order, fused batching, parking, moves and snapshots; no I/O."""

    def __init__(
        self,
        operations: OperationStore,
        sessions: SessionRegistry,
        *,
        clock: Callable[[], float],
        note: Callable[[StoreWrite], int],
        gap_timeout_s: float = 300.0,
        batch_token_budget: int = 16384,
        batch_wait_s: float = 0.0,
        merge_wait_s: float = 0.0,
        fair_share_grace_s: float = 0.1,
        unreachable_retry_s: float = 1.0,
        move_retry_s: float = 2.0,
        restore_hold_s: float = 5.0,
        recover_alone: bool = True,
        session_timeout_s: float = 0.0,
        finished_ttl_s: float = 3600.0,
        snapshots: SnapshotPolicy = SnapshotPolicy(),
        movable: bool = True,
        metrics: SchedulerMetrics | None = None,
    ) -> None:
        self.operations = operations
        self.sessions = sessions
        self._clock = clock
        self._note = note
        self._gap_timeout_s = gap_timeout_s
        self._token_budget = batch_token_budget
        self._batch_wait_s = batch_wait_s
        self._merge_wait_s = merge_wait_s
        self._fair_share_grace_s = fair_share_grace_s
        self._retry_s = unreachable_retry_s
        self._move_retry_s = move_retry_s
        self._restore_hold_s = restore_hold_s
        self._recover_alone = recover_alone
        self._session_timeout_s = session_timeout_s
        self._finished_ttl_s = finished_ttl_s
        self.snapshots = SnapshotBook(snapshots)
        self.movable = movable  # moves replay kept calls, so they need a state store
        self._metrics = metrics or SchedulerMetrics()
        self.lanes: dict[str, RunLane] = {}
        self._nodes: dict[str, _Node] = {}
        self._actions: list[Action] = []  # decided, not yet handed to the driver
        self._parked: dict[str, tuple[float, OperationRecord]] = {}  # op name -> (send at, op)
        self._move_at: dict[str, float] = {}  # run -> when its failed move is tried again
        self.moving: set[str] = set()  # runs being moved or frozen: nothing of theirs goes out
        self._standins: dict[str, _Replay] = {}  # replayed call's stand-in operation -> its replay
        self._uncompacted: dict[str, list[OperationRecord]] = {}  # forgotten, stored record not yet deleted
        self._replays: dict[str, _Replay] = {}  # moved runs whose calls after the snapshot are being replayed
        self._rebalancing: dict[str, str] = {}  # run moved to a trainer that joined -> the trainer it leaves
        self._recovering: set[str] = set()  # moved while its client waited: until its next answer
        self._written_while_moving: dict[str, dict[int, str]] = {}  # run -> seq_id -> snapshot, kept for the move
        self._draining: set[str] = set()  # to move for balance once no call is out and its snapshots are written

    # ---- runs ------------------------------------------------------------------------

    def add_run(self, run: RunRecord) -> RunLane:
        if run.name not in self.lanes:
            self.lanes[run.name] = RunLane(run, self._gap_timeout_s, self._release, self._fail_gap, self._clock)
        return self.lanes[run.name]

    def remove_run(self, name: str) -> None:
        """Forget a deleted run (it is idle)."""
        lane = self.lanes.pop(name)
        lane.close()
        self.snapshots.forget(name)
        self._move_at.pop(name, None)
        self._rebalancing.pop(name, None)
        self._recovering.discard(name)
        self._written_while_moving.pop(name, None)
        self._draining.discard(name)
        self._uncompacted.pop(name, None)

    def restore(self, plan: RecoveryPlan) -> None:
        """Take over the runs and operations of a previous scheduler. Queued operations
        go out again, with the runs' new epochs."""
        finished = sorted((op for r in plan.runs for op in r.finished), key=lambda o: (o.end_time or 0, o.name))
        for op in finished:  # by end time: the order eviction expects
            self.operations.restore(op)
        for recovered in plan.runs:
            self._note(StoreWrite(recovered.run))  # its new epoch
            lane = self.add_run(recovered.run)
            for op in recovered.queued:
                self.operations.restore(op)
            for op in recovered.finished + recovered.queued:
                lane.restore(op)
            lane.pump()
            for op in recovered.lost:
                self._note(StoreWrite(op, delete=True))
        for op in plan.orphans:
            self._note(StoreWrite(op, delete=True))

    # ---- operations ------------------------------------------------------------------

    def submit(self, op: OperationRecord) -> None:
        """Queue a new operation of a known run; it goes out once its turn comes."""
        self.lanes[op.run].add(op)

    def cancel(self, op: OperationRecord) -> bool:
        """Cancel a QUEUED operation that has not gone out; False when it cannot be (it
        is running, or its outcome is in doubt)."""
        if op.state is not OpState.QUEUED:
            return False
        lane = self.lanes[op.run]
        if op is lane.head and not self._node(op.node_id).ready.discard(op):
            return False
        self.operations.cancel(op)
        lane.on_done(op)
        return True

    # ---- what to send ----------------------------------------------------------------

    def next_actions(self, now: float) -> list[Action]:
        """Everything to send now: due retries and moves first, then one batch per free
        node whose merge window has passed. Operations in a returned batch are RUNNING.
        Gaps whose deadline passed fail their waiting operations here too (not only at
        the next `tick`), so no deadline `next_deadline` reports stays in the past."""
        for lane in list(self.lanes.values()):
            if lane.gap_deadline is not None and lane.gap_deadline <= now:
                lane.expire(now)
        for name, (at, op) in list(self._parked.items()):
            if at <= now:
                del self._parked[name]
                self._release_again(op)
        for run, at in list(self._move_at.items()):
            if at <= now:
                del self._move_at[run]
                if run in self.lanes:
                    self._actions.append(self._move_of(self.lanes[run].run))
        for node_id, node in self._nodes.items():
            if node.in_flight is None and node.ready and not self._held(node, now) and (
                node.backlog or now >= self._window_end(node_id, node, now)
            ):
                self._actions.append(self._take_batch(node_id, node, now))
        actions, self._actions = self._actions, []
        return actions

    def next_deadline(self) -> float | None:
        """The earliest time `next_actions` or `tick` may decide something new on its own."""
        times = [at for at, _ in self._parked.values()] + list(self._move_at.values())
        times += [self._window_end(i, n, n.ready_since) for i, n in self._nodes.items()
                  if n.in_flight is None and n.ready and n.ready_since is not None]
        times += [n.held_until for n in self._nodes.values() if n.in_flight is None and n.ready and n.restoring]
        times += [lane.gap_deadline for lane in self.lanes.values() if lane.gap_deadline is not None]
        return min(times, default=None)

    def _window_end(self, node_id: str, node: _Node, now: float) -> float:
        """When the merge window of a free node's next round closes: `batch_wait_s` after its
        first ready operation, or later while some run of its last round has nothing ready
        yet: at most `merge_wait_s`, and at most MERGE_WAIT_SHARE of that round's time. Its
        client got its answer with the others' and is sending its next call; without the
        wait, the first call to arrive would go out alone and the others wait a whole
        round for it (on a CPU, where a round's time grows with its rows, every step of
        clients that wait for each answer would alternate a round of one and one of the
        rest). A lone run, or runs whose next calls are all here, never wait."""
        if node.ready_since is None:  # work left from before (a backlog, a node back): no window
            return now
        opened = node.ready_since
        end = opened + self._batch_wait_s
        if self._merge_wait_s > 0 and node.last_runs:
            ready = {op.run for op in node.ready.ops()}
            if any(run not in ready and self._comes_back(run, node_id) for run in node.last_runs):
                end = max(end, opened + min(self._merge_wait_s, MERGE_WAIT_SHARE * node.last_round_s))
        return end

    def _comes_back(self, run: str, node_id: str) -> bool:
        """Whether a run of a node's last round may still send its next call there."""
        lane = self.lanes.get(run)
        return lane is not None and lane.run.node_id == node_id and run not in self.moving

    def _held(self, node: _Node, now: float) -> bool:
        return bool(node.restoring) and now < node.held_until and self._first_back(node) is None

    def _first_back(self, node: _Node) -> OperationRecord | None:
        """With `recover_alone`, the ready operation of a run that moved here while its
        client waited that is fewest calls from that client's answer (its replay first).
        It goes out in a round of its own: on a node whose round time grows with its
        rows (a CPU) the moved runs then answer one after another instead of all at the
        end of one round as long as theirs together, and nobody's step ends later; on a
        GPU, where a fused round costs about as much as one of its rows, each costs a
        round of milliseconds."""
        if not self._recover_alone or not self._recovering:
            return None
        back = [op for op in node.ready.ops() if op.run in self._recovering]
        return min(back, key=self._calls_to_answer, default=None)

    def _calls_to_answer(self, op: OperationRecord) -> int:
        replay = self._standins.get(op.name)
        return 1 + (len(replay.calls) if replay is not None else 0)

    def _take_batch(self, node_id: str, node: _Node, now: float) -> Batch:
        # a tenant served here moments ago is still active: its next op is on its way, so
        # another tenant's flood does not fill the batch meanwhile (core/fairness.py)
        node.served = {t: at for t, at in node.served.items() if now - at <= self._fair_share_grace_s}
        first_back = self._first_back(node)
        if first_back is not None:
            node.ready.discard(first_back)
            heads = [first_back]
        else:
            heads = node.ready.take(self._token_budget, contending=node.served)
        node.ready_since = None
        # A head's run may send its next op along when the trainer applies it right after
        # (an optim_step after a forward op): one trainer round per training step.
        ops = heads + [c for op in heads if (c := self._companion_of(op)) is not None]
        items = [BatchItem(op.name, op.run, op.kind, op.payload, op.num_tokens, Fence(op.seq_id, op.epoch),
                           SnapshotTarget(op.snapshot_path, op.tenant) if op.snapshot_path else None)
                 for op in ops]
        for op in ops:
            self._mark_running(op)
        batch = Batch(node_id, ops, items, now)
        node.in_flight = batch
        tokens = sum(op.num_tokens for op in ops)
        node.batches_total += 1
        node.batch_items_total += len(ops)
        node.batch_tokens_total += tokens
        self._metrics.batch(node_id, len(ops), tokens)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("round to %s: %s", node_id, ", ".join(f"{op.run} {op.seq_id}" for op in ops))
        for op in ops:
            if op.num_tokens and op.name not in self._standins:  # a replay is not the tenant's usage
                self._metrics.tokens(op.tenant, op.kind.value, op.num_tokens)
        return batch

    def _mark_running(self, op: OperationRecord) -> None:
        if op.name in self._standins:
            op.state = OpState.RUNNING
        else:
            self.operations.mark_running(op)

    def _companion_of(self, op: OperationRecord) -> OperationRecord | None:
        """The run's optim_step right after forward op `op`, if already queued."""
        if op.kind is OpKind.OPTIM_STEP:
            return None
        if op.name in self._standins:
            return self._replay_companion(op)
        if op.run in self.moving:
            return None
        lane = self.lanes[op.run]
        nxt = lane.find(op.seq_id + 1)
        if nxt is not None and nxt.kind is OpKind.OPTIM_STEP and nxt.state is OpState.QUEUED:
            self._mark_snapshot(lane.run, nxt)
            return nxt
        return None

    def _release(self, op: OperationRecord) -> None:
        """A run's head is ready to go out."""
        if op.run in self.moving or op.run in self._draining:
            return  # the move releases the run's head on its new node
        run = self.lanes[op.run].run
        if not run.node_id:  # frozen: rebuilt first, then the move releases the head
            self._move(run)
            return
        self._mark_snapshot(run, op)
        if op.kind in BATCHABLE_KINDS:
            node = self._node(op.node_id)
            if not node.ready and node.ready_since is None:
                node.ready_since = self._clock()
            node.ready.push(op)
        else:
            self._start_single(op)

    def _start_single(self, op: OperationRecord) -> None:
        self._mark_running(op)
        self._node(op.node_id).singles_running += 1
        self._actions.append(Single(op))

    def _release_again(self, op: OperationRecord) -> None:
        lane = self.lanes.get(op.run)
        if lane is not None and op is lane.head and op.state is OpState.QUEUED:
            self._release(op)

    def _node(self, node_id: str) -> _Node:
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = _Node()
        return node

    # ---- answers ---------------------------------------------------------------------

    def complete_batch(self, batch: Batch, outcomes: list[ItemOutcome] | None,
                       error: OperationError | None = None) -> None:
        """The trainer answered `batch` (one outcome per item), or the call failed with
        `error` (every item gets it)."""
        node = self._node(batch.node_id)
        if node.in_flight is batch:
            node.in_flight = None
        node.backlog = bool(node.ready)
        if node.restoring:  # the rebuilds waited for this round to end: they end now
            node.held_until = max(node.held_until, self._clock() + self._restore_hold_s)
        log.debug("round of %d items answered by %s after %.3f s%s", len(batch.ops), batch.node_id,
                  self._clock() - batch.sent_at, f" ({error.reason})" if error else "")
        if error is None and (outcomes is None or len(outcomes) != len(batch.ops)):
            log.error("trainer %s answered %s outcomes for %d items", batch.node_id,
                      None if outcomes is None else len(outcomes), len(batch.ops))
            error = OperationError(Code.INTERNAL, "BAD_BATCH_RESPONSE", "trainer answer malformed")
        if error is not None:
            outcomes = [ItemOutcome(error=error)] * len(batch.ops)
        now = self._clock()
        node.last_runs, node.last_round_s = frozenset(op.run for op in batch.ops), now - batch.sent_at
        if error is None and self.movable:  # what a move of these runs would replay grew by this round
            worked = {op.run for op in batch.ops if op.kind in STATEFUL_KINDS and op.run in self.lanes}
            self.snapshots.worked([self.lanes[run].run for run in worked], now - batch.sent_at, now)
        for op, item, outcome in zip(batch.ops, batch.items, outcomes, strict=True):
            node.served[op.tenant] = now
            self._finish(op, dataclasses.replace(outcome, epoch=item.fence.epoch))

    def complete_single(self, single: Single, outcome: ItemOutcome) -> None:
        """A checkpoint call ended (`outcome.epoch` is the epoch it was sent with)."""
        self._node(single.op.node_id).singles_running -= 1
        self._finish(single.op, outcome)

    def _finish(self, op: OperationRecord, outcome: ItemOutcome) -> None:
        if op.name in self._standins:
            self._replayed(op, outcome)
            return
        if op.done:
            return
        parked = _in_doubt(outcome.error) if self.movable else None
        if (self.movable and outcome.error is not None and outcome.error.reason == FORGOTTEN_REASON
                and op.run in self.lanes
                and op.seq_id > self.lanes[op.run].run.snapshot_seq_id):  # a snapshot before it can recompute it
            parked = outcome.error
        if op.run in self.moving or op.epoch != outcome.epoch:
            parked = OperationError(Code.UNAVAILABLE, "RUN_MOVED", "the run moved while the call was out")
        if parked is not None and op.run in self.lanes:
            self._park(op, parked)
            return
        self._recovering.discard(op.run)
        if outcome.error is not None:
            self.operations.fail(op, outcome.error)
        else:
            self.operations.succeed(op, outcome.result)
            if op.kind is OpKind.OPTIM_STEP:
                self.lanes[op.run].run.step += 1
            elif op.kind is OpKind.LOAD_STATE:
                self.lanes[op.run].run.step = outcome.result.step
        self._snapshot_finished(self.lanes[op.run].run, op)
        self.lanes[op.run].on_done(op)
        self._drained(op.run)

    def _park(self, op: OperationRecord, why: OperationError) -> None:
        log.info("sending %s again later: %s", op.name, why.message, extra={"run": op.run, "operation": op.name})
        self.operations.requeue(op)
        run = self.lanes[op.run].run
        if why.reason in MOVE_REASONS and self.movable:
            self._move(run)
        elif op.run not in self.moving:
            self._parked[op.name] = (self._clock() + self._retry_s, op)
            self._drained(op.run)

    def _fail_gap(self, lane: RunLane, waiting: list[OperationRecord]) -> None:
        log.warning("seq_id %d never arrived; failing %d ops", lane.next_seq_id, len(waiting),
                    extra={"run": lane.run.name})
        error = OperationError(
            Code.FAILED_PRECONDITION, "SEQ_ID_GAP",
            f"seq_id {lane.next_seq_id} of {lane.run.name} did not arrive within {self._gap_timeout_s:g}s",
        )
        for op in waiting:
            self.operations.fail(op, error)
        lane.pump()

    # ---- time ------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Everything time decides: gap deadlines, expired sessions, forgotten operations."""
        for lane in list(self.lanes.values()):
            lane.expire(now)
        self.evict_finished(now)
        self.sweep_sessions(now)

    def sweep_sessions(self, now: float) -> None:
        """End sessions past their heartbeat timeout; freeze the idle runs of ended ones."""
        if self._session_timeout_s:
            for record in self.sessions.expire(now - self._session_timeout_s):
                log.info("session %s expired (no heartbeat for %gs)", record.name, self._session_timeout_s,
                         extra={"tenant": record.tenant})
        ended = self.sessions.ended()
        for lane in self.lanes.values():
            run = lane.run
            if run.session in ended and run.node_id and lane.idle() and run.name not in self.moving:
                self._freeze(run)

    def evict_finished(self, now: float) -> int:
        """Forget operations finished more than `finished_ttl_s` before `now`. Their
        stored records go once the run's floor passes them (one cancelled behind a
        long-running operation can be forgotten before that: it waits here)."""
        evicted = self.operations.evict_finished(now - self._finished_ttl_s)
        for op in evicted:
            lane = self.lanes.get(op.run)
            if lane is not None:
                lane.forget(op)
                self._uncompacted.setdefault(op.run, []).append(op)
        compacted = []
        for run_name, ops in list(self._uncompacted.items()):
            lane = self.lanes.get(run_name)
            if lane is None:
                del self._uncompacted[run_name]
                continue
            passed = [op for op in ops if op.seq_id <= lane.run.last_seq_id]
            if passed:
                compacted += passed
                self._uncompacted[run_name] = [op for op in ops if op.seq_id > lane.run.last_seq_id]
            if not self._uncompacted[run_name]:
                del self._uncompacted[run_name]
        # The runs' floors (last_seq_id, step) are stored before their log shrinks.
        for run in {op.run: self.lanes[op.run].run for op in compacted}.values():
            run.floor = (run.last_seq_id, run.step)
            self._note(StoreWrite(run, deferrable=True))
        for op in compacted:
            self._note(StoreWrite(op, delete=True, deferrable=True))
        return len(evicted)

    # ---- moves and freezes -----------------------------------------------------------

    def node_lost(self, node_id: str) -> None:
        """Trainer `node_id` left (its lease lapsed): move every run it held."""
        for lane in list(self.lanes.values()):
            if lane.run.node_id == node_id:
                self._move(lane.run)

    def node_joined(self, node_id: str, models: Collection[str] = ()) -> None:
        """Trainer `node_id` (re)joined, serving `models`: it may still hold adapters of
        runs that moved away meanwhile (it was paused or cut off past its lease), and it
        takes runs of its models over from the busiest trainer of theirs until none holds
        two more than it (a trainer that died and came back would otherwise idle while
        its runs crowd the survivor); a busy one once it is quiet (`_drain_then_move`)."""
        if self.movable:
            self._actions.append(FreeMovedAway(node_id))
            self._rebalance(node_id, set(models))

    def _rebalance(self, node_id: str, models: set[str]) -> None:
        placed = [lane.run for lane in self.lanes.values() if lane.run.base_model in models
                  and lane.run.node_id and lane.run.name not in self.moving and lane.run.name not in self._draining]
        counts = collections.Counter(run.node_id for run in placed)
        counts[node_id] += 0
        while True:
            busiest = max(counts, key=lambda n: (counts[n], n))
            if counts[busiest] - counts[node_id] < 2:
                return
            # an idle run first (its move delays nobody), then the one with the least to replay
            run = min((r for r in placed if r.node_id == busiest and r.name not in self.moving
                       and r.name not in self._draining),
                      key=lambda r: (not self.lanes[r.name].idle(), r.last_seq_id - r.snapshot_seq_id, r.name))
            log.info("moving %s from %s to %s, which holds %d runs of %s against %d", run.name, busiest, node_id,
                     counts[node_id], run.base_model, counts[busiest], extra={"run": run.name})
            self._rebalancing[run.name] = busiest
            self._drain_then_move(run)
            counts[busiest] -= 1
            counts[node_id] += 1

    def _drain_then_move(self, run: RunRecord) -> None:
        """Move `run` for balance once nothing of it is lost by moving: no call out (its
        answer would be thrown away and the call computed again) and no snapshot being
        written (the move would replay the step). Meanwhile its next call waits, so this
        takes one round and a snapshot write, not a step computed twice."""
        self._draining.add(run.name)
        self._withdraw_head(self.lanes[run.name])
        self._drained(run.name)

    def _drained(self, run_name: str) -> None:
        """Move a draining run once it is quiet."""
        if run_name not in self._draining:
            return
        lane = self.lanes[run_name]
        if self._being_written(lane) or any(op.state is OpState.RUNNING for op in lane.unfinished()):
            return
        self._draining.discard(run_name)
        self._move(lane.run)

    def moved_away(self, node_id: str, adapter: str) -> bool:
        """Whether adapter `adapter` held by `node_id` belongs to a run placed elsewhere
        now (unknown adapters are left to the takeover of a starting scheduler)."""
        lane = self.lanes.get(adapter)
        return lane is not None and lane.run.node_id != node_id and adapter not in self.moving

    def relocate(self, run_name: str) -> None:
        """Rebuild a run whose trainer lost its adapter, from its snapshot and log."""
        lane = self.lanes.get(run_name)
        if lane is not None:
            self._move(lane.run)

    def _move(self, run: RunRecord) -> None:
        if not self.movable or run.name not in self.lanes or run.name in self.moving:
            return
        self._draining.discard(run.name)  # moved anyway (its trainer left): at once
        self.moving.add(run.name)
        self._withdraw_head(self.lanes[run.name])
        self._actions.append(self._move_of(run))

    def _withdraw_head(self, lane: RunLane) -> None:
        """The run's queued head waits for its new node (`_serve_again` releases it)."""
        if lane.head is not None and lane.head.state is OpState.QUEUED:
            self._node(lane.head.node_id).ready.discard(lane.head)
            self._parked.pop(lane.head.name, None)

    def _being_written(self, lane: RunLane) -> dict[int, str]:
        """seq_id -> path of the run's snapshots asked for after steps that succeeded and
        not confirmed yet (its trainer may be writing them, or have written them)."""
        found = {}
        for seq_id in self.snapshots.writing(lane.run.name):
            op = lane.find(seq_id)
            if op is not None and op.state is OpState.SUCCEEDED and op.snapshot_path:
                found[seq_id] = op.snapshot_path
        return found

    def _move_of(self, run: RunRecord) -> Move:
        """The move of `run`, with the snapshots it may start from besides the run's own:
        those asked for after steps that succeeded whose confirmation had not come (the
        trainer may have written them and died before saying so), and those confirmed
        while the run was moving (a failed move's, kept for the next try)."""
        lane = self.lanes[run.name]
        candidates = {**self._written_while_moving.get(run.name, {}), **self._being_written(lane)}
        newer = sorted(((s, p) for s, p in candidates.items() if s > run.snapshot_seq_id), reverse=True)
        return Move(run, lane.history(), tuple(newer))

    def restoring(self, move: Move, node_id: str) -> None:
        """`move` placed its run on `node_id` and is rebuilding its adapter there. That node
        sends no round until the rebuild ends, for up to `restore_hold_s` after it began or
        after the end of the round it waited for (see `complete_batch`): the trainer
        rebuilds between two rounds, and the run's replay then rides the very next one
        (not the one after, which costs a moved run a whole round on a slow model)."""
        node = self._node(node_id)
        node.restoring.add(move.run.name)
        node.held_until = max(node.held_until, self._clock() + self._restore_hold_s)

    def _restored(self, run_name: str) -> None:
        for node in self._nodes.values():
            node.restoring.discard(run_name)

    def moved(self, move: Move, node_id: str, epoch: int,
              replay: list[tuple[OperationRecord, Work]] = (), started_from: tuple[int, str] | None = None,
              ) -> list[str]:
        """`move` rebuilt the run's adapter on `node_id` with `epoch`, up to its snapshot,
        or up to `started_from` (seq_id, path): one of `move.unconfirmed`, which the run's
        record names from now on. `replay` (original operation, call) goes there first,
        in order; then the run's waiting operations follow. Returns the snapshots to
        delete (superseded, or written while the run moved and not started from)."""
        run = move.run
        self._restored(run.name)
        run.node_id, run.epoch = node_id, epoch
        doomed = []
        if started_from is not None and started_from[0] > run.snapshot_seq_id:
            doomed += [run.snapshot_path] if run.snapshot_path else []
            run.snapshot_seq_id, run.snapshot_path = started_from
            self.snapshots.forget(run.name)  # its rules count from the move on
            log.info("%s moved from its snapshot after seq_id %d, written as its trainer died", run.name,
                     run.snapshot_seq_id, extra={"run": run.name})
            self._note(StoreWrite(run, trim_through=run.snapshot_seq_id))
        else:
            self._note(StoreWrite(run))
        written = self._written_while_moving.pop(run.name, {})
        doomed += [path for path in written.values() if path != run.snapshot_path]
        lane = self.lanes.get(run.name)
        if lane is None:
            self.moving.discard(run.name)
            return doomed
        if replay or lane.unfinished():
            self._recovering.add(run.name)
        for op in lane.unfinished():
            self.operations.reassign(op, run.node_id, run.epoch)
        if replay:
            self._replays[run.name] = _Replay(move, collections.deque(replay))
            self._replay_next(run.name)
        else:
            self._serve_again(run)
        return doomed

    def _serve_again(self, run: RunRecord) -> None:
        """The run's move is over: its head goes out on its new node."""
        self.moving.discard(run.name)
        left = self._rebalancing.pop(run.name, "")
        if left and left != run.node_id:
            self._actions.append(FreeMovedAway(left))  # the live trainer it left holds a stale copy
        lane = self.lanes[run.name]
        if lane.head is not None and lane.head.state is OpState.QUEUED:
            self._release(lane.head)

    # ---- replay: a moved run's calls after its snapshot, through the normal dispatch --

    def _standin(self, replay: _Replay) -> OperationRecord:
        """The next call of `replay` as an operation of its run's new node and epoch."""
        op, call = replay.calls.popleft()
        run = replay.move.run
        standin = dataclasses.replace(op, name=f"{op.name}/replay-{run.epoch}", state=OpState.QUEUED, payload=call,
                                      node_id=run.node_id, epoch=run.epoch, snapshot_path="", result=None,
                                      error=None, end_time=None)
        self._standins[standin.name] = replay
        replay.out += 1
        replay.sent += 1
        return standin

    def _replay_next(self, run_name: str) -> None:
        replay = self._replays[run_name]
        if replay.out:
            return  # the calls still out are answered first
        if not replay.calls:
            del self._replays[run_name]
            log.info("replayed %d calls of %s on %s", replay.sent, run_name, replay.move.run.node_id,
                     extra={"run": run_name})
            self._serve_again(replay.move.run)
            return
        standin = self._standin(replay)
        if standin.kind in BATCHABLE_KINDS:
            self._node(standin.node_id).ready.push(standin)
        else:
            self._start_single(standin)

    def _replay_companion(self, standin: OperationRecord) -> OperationRecord | None:
        """The replayed optim_step right after replayed forward op `standin`: it rides
        along, as it did when it first ran."""
        replay = self._standins[standin.name]
        if replay.calls:
            op, _ = replay.calls[0]
            if op.kind is OpKind.OPTIM_STEP and op.seq_id == standin.seq_id + 1:
                return self._standin(replay)
        return None

    def _replayed(self, standin: OperationRecord, outcome: ItemOutcome) -> None:
        replay = self._standins.pop(standin.name)
        replay.out -= 1
        run = replay.move.run
        if self._replays.get(run.name) is not replay:
            return  # an answer of a replay given up
        if _in_doubt(outcome.error) is not None or outcome.epoch != run.epoch:
            log.warning("replay of seq_id %d of %s in doubt (%s): moving the run again", standin.seq_id, run.name,
                        outcome.error.message if outcome.error else "epoch changed", extra={"run": run.name})
            del self._replays[run.name]
            self.move_failed(replay.move)
            return
        if outcome.error is not None:
            log.error("replay of seq_id %d of %s failed although it succeeded before: %s", standin.seq_id,
                      run.name, outcome.error, extra={"run": run.name})
        self._replay_next(run.name)

    def move_failed(self, move: Move) -> None:
        """`move` did not finish (no trainer, a call failed, a replayed call in doubt):
        it is tried again, from the snapshot."""
        self._restored(move.run.name)
        if move.run.name in self.lanes:
            self._move_at[move.run.name] = self._clock() + self._move_retry_s

    def _freeze(self, run: RunRecord) -> None:
        if self.movable and run.name not in self.moving:
            self._draining.discard(run.name)  # frozen instead: resumed wherever there is room
            self.moving.add(run.name)
            self._actions.append(Freeze(run))

    def frozen(self, freeze: Freeze) -> None:
        """The run's adapter and placement are released (or could not be: the takeover
        of a later scheduler frees what is left)."""
        freeze.run.node_id = ""
        self._note(StoreWrite(freeze.run))
        self.moving.discard(freeze.run.name)
        lane = self.lanes.get(freeze.run.name)
        if lane is not None and lane.head is not None and lane.head.state is OpState.QUEUED:
            self._release(lane.head)  # a call came while it froze: rebuild the run

    # ---- snapshots -------------------------------------------------------------------

    def _mark_snapshot(self, run: RunRecord, op: OperationRecord) -> None:
        """Ask for a snapshot after OPTIM_STEP `op` when one is due."""
        if self.movable and op.kind is OpKind.OPTIM_STEP:
            self.snapshots.mark(run, op, self._clock())

    def _snapshot_finished(self, run: RunRecord, op: OperationRecord) -> None:
        if self.snapshots.finished(run, op):
            self._actions.append(ConfirmSnapshot(run, op))

    def snapshot_written(self, confirm: ConfirmSnapshot) -> str:
        """The trainer wrote the snapshot: the run's record names it and the calls it
        covers are dropped from the store. Returns the superseded snapshot to delete
        ('' when none)."""
        superseded = self._snapshot_written(confirm)
        self._drained(confirm.run.name)
        return superseded

    def _snapshot_written(self, confirm: ConfirmSnapshot) -> str:
        run, op = confirm.run, confirm.op
        if run.name in self.moving:  # the move may start from it: `moved` keeps or deletes it
            self.snapshots.failed(run, op.seq_id)
            if op.snapshot_path != run.snapshot_path:
                self._written_while_moving.setdefault(run.name, {})[op.seq_id] = op.snapshot_path
            return ""
        if run.name not in self.lanes:
            return op.snapshot_path  # the run was deleted meanwhile: nobody's
        if not self.snapshots.written(run, op.seq_id, self._clock()):
            return ""  # its bookkeeping started over (a move from another snapshot)
        if op.seq_id < run.snapshot_seq_id:
            return op.snapshot_path  # a later snapshot was written first: this one is superseded
        previous = run.snapshot_path
        if op.seq_id > run.snapshot_seq_id:
            run.snapshot_path, run.snapshot_seq_id = op.snapshot_path, op.seq_id
            self._note(StoreWrite(run, trim_through=op.seq_id))
        log.info("snapshot of %s after seq_id %d", run.name, op.seq_id, extra={"run": run.name})
        return previous if previous and previous != run.snapshot_path else ""

    def snapshot_failed(self, confirm: ConfirmSnapshot) -> None:
        self.snapshots.failed(confirm.run, confirm.op.seq_id)
        self._drained(confirm.run.name)

    # ---- status ----------------------------------------------------------------------

    def node_status(self) -> dict[str, dict[str, Any]]:
        return {
            node_id: {
                "ready": len(node.ready),
                "ready_by_tenant": node.ready.depth_by_tenant(),
                "batch_running": node.in_flight is not None,
                "singles_running": node.singles_running,
                "batches_total": node.batches_total,
                "batch_items_total": node.batch_items_total,
                "batch_tokens_total": node.batch_tokens_total,
            }
            for node_id, node in self._nodes.items()
        }


def _in_doubt(error: OperationError | None) -> OperationError | None:
    """`error` when it does not say the call certainly failed where it was applied."""
    if error is not None and error.reason in IN_DOUBT_REASONS:
        return error
    return None
