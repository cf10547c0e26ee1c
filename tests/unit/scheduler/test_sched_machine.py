"""The scheduler's pure state machine, step by step: no event loop, no sleeps, no
servers. Each test is a sequence of submits, `next_actions(now)`, answers and ticks,
with the time passed in."""

from __future__ import annotations

import asyncio
import itertools

from tunemesh.errors import Code
from tunemesh_scheduler.core import idempotency, recovery
from tunemesh_scheduler.core.actions import Batch, ConfirmSnapshot, Freeze, FreeMovedAway, Move, Single
from tunemesh_scheduler.core.machine import SchedulerMachine
from tunemesh_scheduler.core.snapshots import SnapshotPolicy, snapshot_path
from tunemesh_scheduler.core.operations import OperationStore
from tunemesh_scheduler.core.ports import ItemOutcome, LoadResult, StoreWrite
from tunemesh_scheduler.core.work import LoadRequest, SaveRequest
from tunemesh_scheduler.core.records import OperationError, OpKind, OpState, RunRecord
from tunemesh_scheduler.core.sessions import SessionRegistry
from tunemesh_scheduler.core.store import MemoryRunStore

FB, OPTIM = OpKind.FORWARD_BACKWARD, OpKind.OPTIM_STEP
UNREACHABLE = OperationError(int(Code.UNAVAILABLE), "TRAINER_UNAVAILABLE", "trainer unreachable")
LOST = OperationError(int(Code.NOT_FOUND), "ADAPTER_NOT_FOUND", "no such adapter on this trainer")
FORGOTTEN = OperationError(int(Code.FAILED_PRECONDITION), "SEQ_ID_APPLIED", "applied long ago; its outcome is gone")
BAD = OperationError(int(Code.INVALID_ARGUMENT), "BAD_INPUT", "tokens out of range")


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class World:
    """A machine, its clock, the writes it journals, and shortcuts."""

    def __init__(self, **config) -> None:
        self.clock = Clock()
        self.writes: list[StoreWrite] = []
        ids = itertools.count(1)
        new_id = lambda: f"id{next(ids)}"  # noqa: E731
        note = self._note
        self.machine = SchedulerMachine(
            OperationStore(self.clock, new_id, note=note), SessionRegistry(self.clock, new_id, note),
            clock=self.clock, note=note, **{"unreachable_retry_s": 1.0, "move_retry_s": 2.0, **config},
        )
        self.session = self.machine.sessions.create("t1").name

    def _note(self, write: StoreWrite) -> int:
        self.writes.append(write)
        return len(self.writes)

    def run(self, name: str, node: str = "node-a", tenant: str = "t1") -> RunRecord:
        session = self.session if tenant == "t1" else self.machine.sessions.create(tenant).name
        record = RunRecord(name=name, tenant=tenant, session=session, base_model="tiny", lora=None,
                           node_id=node, create_time=self.clock())
        self._note(StoreWrite(record))  # as RunRegistry.create does
        self.machine.add_run(record)
        return record

    def submit(self, run: RunRecord, seq: int, kind: OpKind = FB, tokens: int = 10, payload=None):
        op = self.machine.operations.create(
            tenant=run.tenant, run=run.name, seq_id=seq, kind=kind, request_id=f"{run.name}-{seq}",
            payload=(run.name, seq) if payload is None else payload, payload_digest=repr((run.name, seq)),
            num_tokens=tokens if kind is not OPTIM else 0, node_id=run.node_id, epoch=run.epoch,
        )
        self.machine.submit(op)
        return op

    def actions(self, dt: float = 0.0) -> list:
        self.clock.t += dt
        return self.machine.next_actions(self.clock())

    def answer(self, batch: Batch, *errors) -> None:
        """Answer every item of `batch` (with `errors[i]` where given)."""
        outcomes = [ItemOutcome(error=errors[i] if i < len(errors) else None, result=f"ok-{op.seq_id}")
                    for i, op in enumerate(batch.ops)]
        self.machine.complete_batch(batch, outcomes)


def _batches(actions) -> list[Batch]:
    return [a for a in actions if isinstance(a, Batch)]


def _only_batch(actions) -> Batch:
    (batch,) = _batches(actions)
    return batch


def _seqs(batch: Batch) -> list[tuple[str, int]]:
    return [(op.run, op.seq_id) for op in batch.ops]


# ---- order and batching ----------------------------------------------------------------


def test_operations_submitted_out_of_order_go_out_in_seq_id_order():
    w = World()
    r = w.run("runs/a")
    ops = {seq: w.submit(r, seq) for seq in (3, 1, 2)}
    sent = []
    while (actions := w.actions()):
        batch = _only_batch(actions)
        sent += _seqs(batch)
        w.answer(batch)
    assert sent == [("runs/a", 1), ("runs/a", 2), ("runs/a", 3)]
    assert all(op.state is OpState.SUCCEEDED for op in ops.values()) and r.last_seq_id == 3


def test_one_batch_per_node_is_out_and_later_arrivals_join_the_next():
    w = World()
    a, b, c = w.run("runs/a"), w.run("runs/b"), w.run("runs/c")
    w.submit(a, 1)
    first = _only_batch(w.actions())
    w.submit(b, 1), w.submit(c, 1)
    assert w.actions() == []  # node-a is busy
    w.answer(first)
    second = _only_batch(w.actions())
    assert sorted(_seqs(second)) == [("runs/b", 1), ("runs/c", 1)]


def test_nodes_dispatch_independently():
    w = World()
    a, b = w.run("runs/a", "node-a"), w.run("runs/b", "node-b")
    w.submit(a, 1), w.submit(b, 1)
    assert sorted(batch.node_id for batch in _batches(w.actions())) == ["node-a", "node-b"]


def test_an_optim_step_already_queued_rides_with_its_forward_backward():
    w = World()
    r = w.run("runs/a")
    fb, step = w.submit(r, 1), w.submit(r, 2, OPTIM)
    batch = _only_batch(w.actions())
    assert batch.ops == [fb, step] and step.state is OpState.RUNNING
    w.answer(batch)
    assert r.last_seq_id == 2 and r.step == 1 and w.actions() == []


def test_the_merge_window_waits_for_other_tenants_and_a_backlog_goes_at_once():
    w = World(batch_wait_s=0.05, batch_token_budget=10)
    a, b, c = w.run("runs/a"), w.run("runs/b", tenant="t2"), w.run("runs/c", tenant="t3")
    w.submit(a, 1)
    assert w.actions() == [] and w.machine.next_deadline() == 1000.05
    w.submit(b, 1), w.submit(c, 1)
    first = _only_batch(w.actions(0.05))
    assert len(first.ops) == 1  # the token budget holds one
    w.answer(first)
    assert len(_only_batch(w.actions()).ops) == 1  # left over: no new window


def _one_round_of_three(w: World, dt: float) -> tuple[list[RunRecord], Batch]:
    """Three tenants' runs, one round of all three that took `dt` seconds, answered."""
    runs = [w.run(f"runs/{i}", tenant=f"t{i}") for i in range(3)]
    for run in runs:
        w.submit(run, 1)
    batch = _only_batch(w.actions())
    assert len(batch.ops) == 3
    w.clock.t += dt
    w.answer(batch)
    return runs, batch


def test_a_free_node_waits_for_the_runs_of_its_last_round_and_goes_once_all_are_back():
    w = World(merge_wait_s=0.1)
    runs, _ = _one_round_of_three(w, dt=5.0)
    w.submit(runs[0], 2)
    assert w.actions() == [] and w.machine.next_deadline() == w.clock() + 0.1  # min(0.1 s, 10 % of 5 s)
    w.submit(runs[1], 2)
    assert w.actions(0.01) == []
    w.submit(runs[2], 2)  # the last one back: no reason left to wait
    assert sorted(_seqs(_only_batch(w.actions(0.01)))) == [("runs/0", 2), ("runs/1", 2), ("runs/2", 2)]


def test_the_merge_wait_is_bounded_by_its_setting_and_by_a_share_of_the_last_round():
    w = World(merge_wait_s=0.1)
    runs, _ = _one_round_of_three(w, dt=0.2)  # 10 % of the round: 20 ms
    w.submit(runs[0], 2)
    assert w.actions(0.019) == []
    alone = _only_batch(w.actions(0.001))
    assert _seqs(alone) == [("runs/0", 2)]  # runs/1 and runs/2 never came back
    w.answer(alone)
    w.submit(runs[0], 3)  # its last round held only itself: no wait now
    assert _seqs(_only_batch(w.actions())) == [("runs/0", 3)]


def test_a_lone_run_and_a_disabled_merge_wait_never_wait():
    w = World(merge_wait_s=0.1)
    lone = w.run("runs/lone")
    w.submit(lone, 1)
    first = _only_batch(w.actions())
    w.answer(first)
    w.submit(lone, 2)
    assert _seqs(_only_batch(w.actions())) == [("runs/lone", 2)]  # its last round held only itself
    off = World()
    runs, _ = _one_round_of_three(off, dt=5.0)
    off.submit(runs[0], 2)
    assert _seqs(_only_batch(off.actions())) == [("runs/0", 2)]


def test_the_token_budget_splits_but_a_larger_op_still_goes_alone():
    w = World(batch_token_budget=15)
    runs = [w.run(f"runs/{i}") for i in range(3)]
    w.submit(runs[0], 1, tokens=40)
    assert _seqs(_only_batch(w.actions())) == [("runs/0", 1)]


def test_checkpoint_calls_go_out_alone_in_their_turn():
    w = World()
    r = w.run("runs/a")
    w.submit(r, 1)
    save = w.submit(r, 2, OpKind.SAVE_STATE, payload=SaveRequest("tunemesh://x/ck", False))
    batch = _only_batch(w.actions())
    w.answer(batch)
    (single,) = w.actions()
    assert isinstance(single, Single) and single.op is save and save.state is OpState.RUNNING
    w.machine.complete_single(single, ItemOutcome(result="ck", epoch=save.epoch))
    assert save.state is OpState.SUCCEEDED and r.last_seq_id == 2


# ---- gaps, failures, cancels ------------------------------------------------------------


def test_a_gap_fails_the_waiting_ops_only_at_its_deadline():
    w = World(gap_timeout_s=30)
    r = w.run("runs/a")
    later = w.submit(r, 2)
    assert w.actions() == [] and w.machine.next_deadline() == 1030
    w.machine.tick(1029.9)
    assert later.state is OpState.QUEUED
    w.machine.tick(1030)
    assert later.state is OpState.FAILED and later.error.reason == "SEQ_ID_GAP"


def test_a_passed_gap_deadline_is_acted_on_by_next_actions_and_never_reported_again():
    """The driver sleeps until `next_deadline`: a deadline that stayed in the past after
    `next_actions` would make it spin until the next periodic tick."""
    w = World(gap_timeout_s=30)
    r = w.run("runs/a")
    later = w.submit(r, 2)
    assert w.actions(dt=29.9) == [] and later.state is OpState.QUEUED
    assert w.actions(dt=0.1) == []
    assert later.state is OpState.FAILED and later.error.reason == "SEQ_ID_GAP"
    assert w.machine.next_deadline() is None


def test_a_final_error_fails_that_op_and_the_run_goes_on():
    w = World()
    r = w.run("runs/a")
    bad, good = w.submit(r, 1), w.submit(r, 2)
    w.answer(_only_batch(w.actions()), BAD)
    assert bad.state is OpState.FAILED and bad.error.reason == "BAD_INPUT"
    w.answer(_only_batch(w.actions()))
    assert good.state is OpState.SUCCEEDED


def test_an_unreachable_trainer_parks_the_op_and_sends_it_again_after_the_retry_wait():
    w = World()
    r = w.run("runs/a")
    op = w.submit(r, 1)
    first = _only_batch(w.actions())
    w.answer(first, UNREACHABLE)
    assert op.state is OpState.QUEUED and op.error is None  # in doubt: never failed
    assert w.actions(0.5) == [] and w.machine.next_deadline() == 1001.0
    again = _only_batch(w.actions(0.5))
    assert again.ops == [op] and again.items[0].fence == first.items[0].fence  # the same seq_id and epoch
    w.answer(again)
    assert op.state is OpState.SUCCEEDED


def test_without_a_store_an_unreachable_trainer_is_a_final_error():
    w = World(movable=False)
    op = w.submit(w.run("runs/a"), 1)
    w.answer(_only_batch(w.actions()), UNREACHABLE)
    assert op.state is OpState.FAILED


def test_a_malformed_answer_fails_the_batch_as_internal():
    w = World(movable=False)
    op = w.submit(w.run("runs/a"), 1)
    w.machine.complete_batch(_only_batch(w.actions()), [])
    assert op.state is OpState.FAILED and op.error.reason == "BAD_BATCH_RESPONSE"


def test_cancel_withdraws_a_waiting_head_but_not_one_in_doubt():
    w = World(batch_wait_s=1.0)
    r = w.run("runs/a")
    head, nxt = w.submit(r, 1), w.submit(r, 2)
    assert w.machine.cancel(head) and head.state is OpState.CANCELLED
    batch = _only_batch(w.actions(1.0))
    assert batch.ops == [nxt]
    w.answer(batch, UNREACHABLE)  # parked: it may have applied
    assert not w.machine.cancel(nxt) and nxt.state is OpState.QUEUED


# ---- moves ------------------------------------------------------------------------------


def test_a_lost_adapter_moves_the_run_and_its_waiting_ops_follow_with_the_new_epoch():
    w = World()
    r, other = w.run("runs/a"), w.run("runs/b")
    done = w.submit(r, 1)
    w.answer(_only_batch(w.actions()))
    op = w.submit(r, 2)
    w.answer(_only_batch(w.actions()), LOST)
    (move,) = w.actions()
    assert isinstance(move, Move) and move.run is r and done in move.history
    w.submit(r, 3), w.submit(other, 1)
    assert [_seqs(b) for b in _batches(w.actions())] == [[("runs/b", 1)]]  # the moving run sends nothing
    w.machine.moved(move, "node-b", 2)
    batch = _only_batch(w.actions())
    assert batch.node_id == "node-b" and batch.ops == [op] and batch.items[0].fence.epoch == 2
    assert StoreWrite(r) in w.writes and r.node_id == "node-b" and r.epoch == 2


def test_a_call_whose_outcome_the_trainer_forgot_moves_the_run_and_is_recomputed_not_failed():
    """A scheduler that took over sends again a call whose finish was never stored (its
    result may have reached the client); the trainer applied it and no longer keeps its
    outcome. Rebuilding from the snapshot and replaying recomputes it: the op succeeds,
    and the run's step counts it."""
    w = World()
    r = w.run("runs/a")
    for seq, kind in ((1, FB), (2, OPTIM)):
        w.submit(r, seq, kind)
        w.answer(_only_batch(w.actions()))
    fb, step = w.submit(r, 3, FB), w.submit(r, 4, OPTIM)
    batch = _only_batch(w.actions())
    assert batch.ops == [fb, step]
    w.answer(batch, FORGOTTEN, FORGOTTEN)
    (move,) = w.actions()
    assert isinstance(move, Move) and move.run is r and [op.seq_id for op in move.history][:2] == [1, 2]
    assert fb.state is OpState.QUEUED and step.state is OpState.QUEUED  # never failed
    w.machine.moved(move, "node-a", 2)
    again = _only_batch(w.actions())
    assert again.ops == [fb, step] and again.items[0].fence.epoch == 2
    w.answer(again)
    assert fb.state is step.state is OpState.SUCCEEDED and r.step == 2


def test_a_forgotten_outcome_at_or_below_the_run_s_snapshot_fails_as_before():
    """No snapshot before the call is left to recompute it from: the error stands."""
    w = World()
    r = w.run("runs/a")
    r.snapshot_seq_id = 5
    op = w.submit(r, 1)
    w.answer(_only_batch(w.actions()), FORGOTTEN)
    assert op.state is OpState.FAILED and op.error.reason == "SEQ_ID_APPLIED"
    assert not [a for a in w.actions() if isinstance(a, Move)]


def _out_when_its_node_is_lost(w: World):
    """A run with its op 1 out on node-a when node-a is lost: (run, op, its batch, the move)."""
    r = w.run("runs/a")
    op = w.submit(r, 1)
    stale = _only_batch(w.actions())
    w.machine.node_lost("node-a")
    (move,) = w.actions()
    return r, op, stale, move


def test_an_answer_from_before_a_move_is_never_taken_as_final():
    w = World()
    r, op, stale, move = _out_when_its_node_is_lost(w)
    w.answer(stale)  # the old trainer answers while the run moves: parked, not succeeded
    assert op.state is OpState.QUEUED and r.last_seq_id == 0
    w.machine.moved(move, "node-b", 2)
    again = _only_batch(w.actions())
    assert again.ops == [op] and again.items[0].fence.epoch == 2
    w.answer(again)
    assert op.state is OpState.SUCCEEDED and op.result == "ok-1"


def test_an_answer_of_an_old_epoch_that_arrives_after_the_move_ended_is_parked():
    w = World()
    r, op, stale, move = _out_when_its_node_is_lost(w)
    w.machine.moved(move, "node-b", 2)  # the move ends before the old trainer answers
    assert w.actions() == []  # the op is still out (RUNNING): nothing sent twice at once
    w.answer(stale)
    assert op.state is OpState.QUEUED
    again = _only_batch(w.actions(1.0))
    assert again.node_id == "node-b" and again.items[0].fence.epoch == 2


def test_a_failed_move_is_tried_again_after_its_retry_wait():
    w = World()
    r = w.run("runs/a")
    w.machine.node_lost("node-a")
    (move,) = w.actions()
    w.machine.move_failed(move)
    assert w.actions(1.9) == []
    (again,) = w.actions(0.1)
    assert isinstance(again, Move) and again.run is r


def test_a_lost_node_moves_only_its_own_runs_and_a_rejoined_one_is_cleaned():
    w = World()
    a, b = w.run("runs/a", "node-a"), w.run("runs/b", "node-b")
    w.machine.node_lost("node-a")
    w.machine.node_lost("node-a")  # twice: one move
    actions = w.actions()
    assert [type(x) for x in actions] == [Move] and actions[0].run is a
    w.machine.moved(actions[0], "node-b", 2)
    w.machine.node_joined("node-a")
    (free,) = w.actions()
    assert isinstance(free, FreeMovedAway) and free.node_id == "node-a"
    assert w.machine.moved_away("node-a", "runs/a") and not w.machine.moved_away("node-b", "runs/b")
    assert not w.machine.moved_away("node-a", "runs/unknown")


def test_a_trainer_that_joins_takes_runs_over_until_none_holds_two_more_idle_ones_first():
    w = World()
    busy = w.run("runs/a")
    idle = [w.run(f"runs/{x}") for x in "bcd"]
    other_model = w.run("runs/m")
    other_model.base_model = "other"
    w.submit(busy, 1)
    out = _only_batch(w.actions())
    w.machine.node_joined("node-b", ["tiny"])
    actions = w.actions()
    assert isinstance(actions[0], FreeMovedAway) and actions[0].node_id == "node-b"
    moves = actions[1:]
    assert [type(a) for a in moves] == [Move, Move]  # 4 against 0: two move, 2 against 2
    assert sorted(m.run.name for m in moves) == ["runs/b", "runs/c"]  # idle ones, not the busy one
    assert {"runs/b", "runs/c"} <= w.machine.moving and "runs/a" not in w.machine.moving
    w.answer(out)
    assert busy.last_seq_id == 1  # its work went on meanwhile
    w.machine.moved(moves[0], "node-b", 2)
    (free,) = w.actions()
    assert isinstance(free, FreeMovedAway) and free.node_id == "node-a"  # its stale copy there
    assert w.machine.moved_away("node-a", moves[0].run.name) and not w.machine.moved_away("node-a", "runs/a")
    assert idle[2].node_id == "node-a" and other_model.node_id == "node-a"


def _moving_with_an_unconfirmed_snapshot(w: World) -> tuple[RunRecord, str, str, Move]:
    r = w.run("runs/a")
    first = _snapshot_step(w, r, 1)
    w.machine.snapshot_written(first)
    second = _snapshot_step(w, r, 3)  # its step succeeded; the confirmation is out
    w.machine.relocate("runs/a")  # (or any move)
    (move,) = w.actions()
    assert "runs/a" in w.machine.moving
    return r, first.op.snapshot_path, second.op.snapshot_path, move


def test_a_move_may_start_from_a_snapshot_whose_confirmation_had_not_come():
    w = World(snapshots=SnapshotPolicy(every_steps=1, every_s=0))
    r, older, newer, move = _moving_with_an_unconfirmed_snapshot(w)
    assert move.unconfirmed == ((4, newer),)
    writes = len(w.writes)
    assert w.machine.moved(move, "node-b", 2, started_from=(4, newer)) == [older]  # superseded
    assert (r.snapshot_seq_id, r.snapshot_path, r.node_id) == (4, newer, "node-b")
    assert any(write.record is r and write.trim_through == 4 for write in w.writes[writes:])
    # The next snapshot is asked for by the rules again, counted from the move.
    assert _step(w, r, 5).items[1].snapshot.path == snapshot_path("runs/a", 6)


def test_a_snapshot_written_while_its_run_moves_is_kept_for_the_move_or_deleted_after_it():
    w = World(snapshots=SnapshotPolicy(every_steps=1, every_s=0))
    r, older, newer, move = _moving_with_an_unconfirmed_snapshot(w)
    confirm = ConfirmSnapshot(r, w.machine.lanes["runs/a"].find(4))
    assert w.machine.snapshot_written(confirm) == ""  # the move may be reading it
    assert (r.snapshot_seq_id, r.snapshot_path) == (2, older)
    # A move that failed: the next try may start from it, though nothing writes it any more.
    w.machine.move_failed(move)
    (again,) = w.actions(2.0)
    assert isinstance(again, Move) and again.unconfirmed == ((4, newer),)
    # A move that did not start from it (the store did not have it when asked) deletes it.
    assert w.machine.moved(again, "node-b", 2) == [newer]
    assert (r.snapshot_seq_id, r.snapshot_path) == (2, older)


def test_a_busy_run_moves_for_balance_once_its_call_is_answered_and_its_snapshot_written():
    """Nothing is computed twice: the move waits for the round out and the snapshot after
    it; the run's next call waits meanwhile and goes to the new trainer."""
    w = World(snapshots=SnapshotPolicy(every_steps=1, every_s=0))
    a, b = w.run("runs/a"), w.run("runs/b")
    for run in (a, b):
        w.submit(run, 1), w.submit(run, 2, OPTIM)
    out = _only_batch(w.actions())
    later = {run.name: w.submit(run, 3) for run in (a, b)}
    w.machine.node_joined("node-b", ["tiny"])
    assert [type(x) for x in w.actions()] == [FreeMovedAway]  # no move while its call is out
    draining = next(iter(w.machine._draining))
    w.answer(out)
    actions = w.actions()
    confirms = {x.run.name: x for x in actions if isinstance(x, ConfirmSnapshot)}
    (next_round,) = _batches(actions)
    assert _seqs(next_round) == [(r, 3) for r in ("runs/a", "runs/b") if r != draining]  # its next call waits
    assert not any(isinstance(x, Move) for x in actions)  # its snapshot is still being written
    w.machine.snapshot_written(confirms[draining])
    (move,) = w.actions()
    assert isinstance(move, Move) and move.run.name == draining
    assert move.run.snapshot_seq_id == move.run.last_seq_id == 2  # nothing to replay
    w.machine.moved(move, "node-b", 2)
    moved_round = _only_batch(w.actions())
    assert moved_round.node_id == "node-b" and moved_round.ops == [later[draining]]


def test_a_run_waiting_to_move_for_balance_whose_session_ends_is_frozen_not_moved():
    w = World(snapshots=SnapshotPolicy(every_steps=1, every_s=0))
    a, b = w.run("runs/a"), w.run("runs/b")
    for run in (a, b):
        w.submit(run, 1), w.submit(run, 2, OPTIM)
    out = _only_batch(w.actions())
    w.machine.node_joined("node-b", ["tiny"])
    w.actions()
    (draining,) = w.machine._draining
    w.answer(out)
    confirms = {x.run.name: x for x in w.actions() if isinstance(x, ConfirmSnapshot)}
    w.machine.sessions.end("t1", w.session)
    w.machine.sweep_sessions(w.clock())
    freezes = {x.run.name: x for x in w.actions() if isinstance(x, Freeze)}
    w.machine.frozen(freezes[draining])
    w.machine.snapshot_written(confirms[draining])
    assert not any(isinstance(x, Move) for x in w.actions())  # frozen, not rebuilt elsewhere


def test_a_joining_trainer_takes_as_many_busy_runs_as_idle_ones():
    w = World()
    runs = [w.run(f"runs/{x}") for x in "abcd"]
    for run in runs:
        w.submit(run, 1)
    out = _only_batch(w.actions())
    w.machine.node_joined("node-b", ["tiny"])
    assert [type(x) for x in w.actions()] == [FreeMovedAway]
    w.answer(out)
    moves = [x for x in w.actions() if isinstance(x, Move)]
    assert len({m.run.name for m in moves}) == 2  # 4 against 0: two distinct runs, then 2 against 2


def test_a_joining_trainer_moves_nothing_when_the_runs_are_balanced_or_not_of_its_model():
    w = World()
    w.run("runs/a"), w.run("runs/b", "node-b")
    w.run("runs/c")  # node-a 2, node-b 1, node-c 0: 2 - 0 is two more
    w.machine.node_joined("node-c", ["other"])
    assert [type(a) for a in w.actions()] == [FreeMovedAway]
    w.machine.node_joined("node-d", ["tiny"])
    assert [type(a) for a in w.actions()] == [FreeMovedAway, Move]
    w.machine.node_joined("node-b", ["tiny"])  # node-b 1, node-a 1 (one moving), node-d 0
    assert [type(a) for a in w.actions()] == [FreeMovedAway]
    static = World(movable=False)
    static.run("runs/a"), static.run("runs/b")
    static.machine.node_joined("node-b", ["tiny"])
    assert static.actions() == []


# ---- snapshots --------------------------------------------------------------------------


def _step(w: World, run: RunRecord, seq: int) -> Batch:
    w.submit(run, seq), w.submit(run, seq + 1, OPTIM)
    batch = _only_batch(w.actions())
    w.answer(batch)
    return batch


def _snapshot_step(w: World, run: RunRecord, seq: int) -> ConfirmSnapshot:
    """One step of `run` whose snapshot is asked for; returns the confirmation to answer."""
    _step(w, run, seq)
    (confirm,) = w.actions()
    return confirm


def test_a_snapshot_is_asked_for_every_k_steps_and_confirmed_before_the_log_is_trimmed():
    w = World(snapshots=SnapshotPolicy(every_steps=2, every_s=0))
    r = w.run("runs/a")
    first = _step(w, r, 1)
    assert first.items[1].snapshot is None and w.actions() == []
    second = _step(w, r, 3)
    assert second.items[1].snapshot.path.endswith("snapshot-000000000004")
    (confirm,) = w.actions()
    assert isinstance(confirm, ConfirmSnapshot) and confirm.op.seq_id == 4
    assert w.machine.snapshot_written(confirm) == ""  # nothing before it
    assert r.snapshot_seq_id == 4 and StoreWrite(r, trim_through=4) in w.writes
    _step(w, r, 5)
    _step(w, r, 7)
    (confirm,) = w.actions()
    assert w.machine.snapshot_written(confirm).endswith("snapshot-000000000004")  # superseded: delete it


def test_a_failed_snapshot_is_asked_for_again_at_the_next_step():
    w = World(snapshots=SnapshotPolicy(every_steps=1, every_s=0))
    r = w.run("runs/a")
    w.machine.snapshot_failed(_snapshot_step(w, r, 1))
    assert r.snapshot_seq_id == 0
    assert _step(w, r, 3).items[1].snapshot is not None


def test_the_next_steps_snapshot_is_asked_for_while_the_last_is_written_and_a_late_one_is_superseded():
    w = World(snapshots=SnapshotPolicy(every_steps=1, every_s=0))
    r = w.run("runs/a")
    w.submit(r, 1), w.submit(r, 2, OPTIM), w.submit(r, 3), w.submit(r, 4, OPTIM)  # two steps pipelined
    first = _only_batch(w.actions())
    w.answer(first)
    actions = w.actions()
    (confirm_2,) = [a for a in actions if isinstance(a, ConfirmSnapshot)]
    second = _only_batch(actions)  # out while the snapshot after seq_id 2 is still written
    assert first.items[1].snapshot is not None and second.items[1].snapshot is not None
    w.answer(second)
    (confirm_4,) = [a for a in w.actions() if isinstance(a, ConfirmSnapshot)]
    assert w.machine.snapshot_written(confirm_4) == ""  # written first
    assert (r.snapshot_seq_id, StoreWrite(r, trim_through=4) in w.writes) == (4, True)
    assert w.machine.snapshot_written(confirm_2) == confirm_2.op.snapshot_path  # late: delete it
    assert r.snapshot_seq_id == 4 and r.snapshot_path == confirm_4.op.snapshot_path
    w.submit(r, 5), w.submit(r, 6, OPTIM)
    assert _only_batch(w.actions()).items[1].snapshot is not None  # nothing left out


def test_a_third_snapshot_waits_until_one_of_two_is_written():
    w = World(snapshots=SnapshotPolicy(every_steps=1, every_s=0))
    r = w.run("runs/a")
    confirms = []
    for seq in (1, 3, 5):
        batch = _step(w, r, seq)
        confirms += [a for a in w.actions() if isinstance(a, ConfirmSnapshot)]
    assert [c.op.seq_id for c in confirms] == [2, 4] and batch.items[1].snapshot is None
    w.machine.snapshot_failed(confirms[0])
    assert _step(w, r, 7).items[1].snapshot is not None


def test_a_step_sent_again_after_a_move_keeps_its_snapshot_and_does_not_hold_back_the_next():
    w = World(snapshots=SnapshotPolicy(every_steps=1, every_s=1))
    r = w.run("runs/a")
    confirm = _snapshot_step(w, r, 1)
    w.submit(r, 3), w.submit(r, 4, OPTIM)
    stale = _only_batch(w.actions())
    w.clock.t += 1  # due again by time when it is sent again
    w.machine.node_lost("node-a")
    (move,) = w.actions()
    w.machine.snapshot_failed(confirm)  # its trainer died before writing it
    w.answer(stale)  # parked while the run moves
    w.machine.moved(move, "node-b", 2)
    again = _only_batch(w.actions())
    assert again.items[1].snapshot == stale.items[1].snapshot  # asked for once, as before
    w.answer(again)
    w.clock.t += 1
    w.submit(r, 5), w.submit(r, 6, OPTIM)  # while the snapshot after seq_id 4 is written
    assert _only_batch(w.actions()).items[1].snapshot is not None


def test_a_snapshot_is_due_after_its_time_too():
    w = World(snapshots=SnapshotPolicy(every_steps=0, every_s=60))
    r = w.run("runs/a")
    assert _step(w, r, 1).items[1].snapshot is None
    w.clock.t += 60
    assert _step(w, r, 3).items[1].snapshot is not None


# ---- sessions ---------------------------------------------------------------------------


def test_an_expired_session_freezes_its_idle_runs_and_a_later_call_rebuilds_them():
    w = World(session_timeout_s=10)
    r = w.run("runs/a")
    w.answer(_only_batch((w.submit(r, 1), w.actions())[1]))
    w.machine.tick(1009)
    assert w.actions() == []
    w.machine.tick(1010.5)
    (freeze,) = w.actions()
    assert isinstance(freeze, Freeze) and freeze.run is r
    w.machine.frozen(freeze)
    assert r.node_id == "" and StoreWrite(r) in w.writes
    w.machine.sessions.restore(w.machine.sessions.get("t1", r.session))  # (resumed elsewhere)
    op = w.submit(r, 2)
    (move,) = w.actions()
    assert isinstance(move, Move)
    w.machine.moved(move, "node-b", 2)
    assert _only_batch(w.actions()).ops == [op]


def test_finished_ops_are_forgotten_after_their_ttl_and_the_floor_is_stored_first():
    w = World(finished_ttl_s=60)
    r = w.run("runs/a")
    op = w.submit(r, 1)
    w.answer(_only_batch(w.actions()))
    assert w.machine.evict_finished(1059) == 0
    w.writes.clear()
    assert w.machine.evict_finished(1061) == 1
    assert w.writes == [StoreWrite(r, deferrable=True), StoreWrite(op, delete=True, deferrable=True)]
    assert r.floor == (1, 0)


# ---- leader change ----------------------------------------------------------------------


def test_a_new_leader_takes_over_queued_ops_with_a_raised_epoch_and_keeps_finished_ones():
    old = World()
    r = old.run("runs/a")
    first = old.submit(r, 1)
    old.answer(_only_batch(old.actions()))
    running = old.submit(r, 2)
    _only_batch(old.actions())  # out when the leader dies
    old.submit(r, 3)
    store = MemoryRunStore()
    asyncio.run(store.apply(old.writes))
    plan = recovery.plan(asyncio.run(store.load()))

    new = World()
    for session in plan.sessions:
        new.machine.sessions.restore(session)
    new.machine.restore(plan)
    lane = new.machine.lanes["runs/a"]
    assert lane.run.epoch == 2 and lane.run.last_seq_id == 1
    # The finished op keeps its meaning: a re-send of it is answered from its record.
    again = idempotency.find_duplicate(None, lane, 1, first.request_id, FB, first.payload_digest)
    assert again is not None and again.state is OpState.SUCCEEDED
    # The op that was running goes out again (the trainer applies a seq_id once), then the next.
    batch = _only_batch(new.actions())
    assert _seqs(batch) == [("runs/a", 2)] and batch.items[0].fence.epoch == 2 and batch.ops[0].name == running.name
    new.answer(batch)
    assert _seqs(_only_batch(new.actions())) == [("runs/a", 3)]


def test_a_load_sets_the_runs_step_from_the_checkpoint():
    w = World()
    r = w.run("runs/a")
    load = w.submit(r, 1, OpKind.LOAD_STATE, payload=LoadRequest("tunemesh://x/ck", True))
    (single,) = w.actions()
    w.machine.complete_single(single, ItemOutcome(result=LoadResult("tunemesh://x/ck", 7), epoch=load.epoch))
    assert r.step == 7 and load.state is OpState.SUCCEEDED


def test_snapshots_are_held_apart_by_the_minimum_interval():
    w = World(snapshots=SnapshotPolicy(every_steps=1, every_s=0, min_interval_s=5))
    r = w.run("runs/a")
    assert _step(w, r, 1).items[1].snapshot is None  # the run's first 5 s
    w.clock.t += 5
    assert _step(w, r, 3).items[1].snapshot is not None
    (confirm,) = w.actions()
    w.machine.snapshot_written(confirm)
    w.clock.t += 4.9
    assert _step(w, r, 5).items[1].snapshot is None  # due by steps, held back by time
    w.clock.t += 0.1
    assert _step(w, r, 7).items[1].snapshot is not None


# ---- replay after a move ----------------------------------------------------------------


def _finished_steps(w: World, run: RunRecord, steps: int) -> list:
    """`steps` forward_backward + optim_step pairs of `run`, done; returns their ops."""
    ops = []
    for i in range(steps):
        ops += [w.submit(run, 2 * i + 1), w.submit(run, 2 * i + 2, OPTIM)]
        w.answer(_only_batch(w.actions()))
    return ops


def test_a_moved_runs_calls_are_replayed_in_order_fused_with_other_work_before_its_waiting_ops():
    w = World(recover_alone=False)
    moved, other = w.run("runs/a"), w.run("runs/b", "node-b")
    done = _finished_steps(w, moved, 2)
    waiting = w.submit(moved, 5)
    w.machine.node_lost("node-a")
    (move,) = w.actions()
    live = w.submit(other, 1)
    w.machine.moved(move, "node-b", 2, [(op, ("call", op.seq_id)) for op in done])
    first = _only_batch(w.actions())
    assert sorted(_seqs(first)) == [("runs/a", 1), ("runs/a", 2), ("runs/b", 1)] and live.state is OpState.RUNNING
    standin = next(i for i, op in enumerate(first.ops) if op.run == "runs/a" and op.seq_id == 1)
    assert first.items[standin].payload == ("call", 1) and first.items[standin].fence.epoch == 2
    assert first.ops[standin].name != done[0].name and done[0].state is OpState.SUCCEEDED  # the record stays
    w.answer(first)
    second = _only_batch(w.actions())
    assert _seqs(second) == [("runs/a", 3), ("runs/a", 4)]  # the rest of the replay
    assert waiting.state is OpState.QUEUED
    w.answer(second)
    batch = _only_batch(w.actions())
    assert batch.ops == [waiting] and batch.items[0].fence.epoch == 2 and "runs/a" not in w.machine.moving
    assert moved.last_seq_id == 4 and moved.step == 2  # replays change no counters


def test_runs_moved_while_their_clients_waited_go_out_alone_fewest_calls_first():
    w = World()
    replayed, plain, idle = w.run("runs/a"), w.run("runs/b"), w.run("runs/i")
    short, own = w.run("runs/d"), w.run("runs/c", "node-b")
    done = _finished_steps(w, replayed, 2)
    waiting_a, waiting_b, waiting_d = w.submit(replayed, 5), w.submit(plain, 1), w.submit(short, 1)
    sent = _only_batch(w.actions())  # out on node-a when it dies
    w.machine.node_lost("node-a")
    moves = {m.run.name: m for m in w.actions()}
    w.machine.complete_batch(sent, None, UNREACHABLE)  # parked: it goes to node-b
    for move in moves.values():
        w.machine.restoring(move, "node-b")
    own_op = w.submit(own, 1)
    assert w.actions() == []  # held while the rebuilds are out

    # The first rebuilt run goes at once, alone, though another one is still being rebuilt.
    w.machine.moved(moves["runs/b"], "node-b", 2)
    first = _only_batch(w.actions())
    assert _seqs(first) == [("runs/b", 1)]
    w.machine.moved(moves["runs/a"], "node-b", 2, [(op, ("call", op.seq_id)) for op in done])
    w.machine.moved(moves["runs/d"], "node-b", 2)
    w.machine.moved(moves["runs/i"], "node-b", 2)  # nobody waits on it: not first
    assert w.actions() == []  # one batch out at a time
    w.answer(first)
    assert waiting_b.state is OpState.SUCCEEDED
    order = []
    while (actions := w.actions()):
        batch = _only_batch(actions)
        order.append(_seqs(batch))
        w.answer(batch)
    assert order == [[("runs/d", 1)], [("runs/a", 1), ("runs/a", 2)], [("runs/a", 3), ("runs/a", 4)], [("runs/a", 5)],
                     [("runs/c", 1)]]  # the node's own run after the moved ones, as a fused round would end
    assert waiting_a.state is waiting_d.state is OpState.SUCCEEDED and own_op.state is OpState.SUCCEEDED

    # Answered: the next calls of the moved runs are fused again.
    later = [w.submit(replayed, 6), w.submit(plain, 2), w.submit(idle, 1)]
    assert sorted(_seqs(_only_batch(w.actions()))) == [("runs/a", 6), ("runs/b", 2), ("runs/i", 1)]
    assert [op.state for op in later] == [OpState.RUNNING] * 3


def test_the_hold_for_a_rebuild_lasts_past_the_round_the_rebuild_waits_for():
    """A trainer rebuilds between two rounds: a rebuild that began during a long round
    ends only after it, so the hold counts again from that round's end."""
    w = World(restore_hold_s=5.0)
    moved, own = w.run("runs/a"), w.run("runs/c", "node-b")
    w.submit(moved, 1)
    dying = _only_batch(w.actions())
    w.submit(own, 1)
    long_round = _only_batch(w.actions())
    w.machine.node_lost("node-a")
    (move,) = w.actions()
    w.machine.complete_batch(dying, None, UNREACHABLE)
    w.machine.restoring(move, "node-b")
    w.clock.t += 6.0  # past the hold; the round is still out, the rebuild waits for its end
    w.answer(long_round)
    w.submit(own, 2)
    assert w.actions(0.5) == []  # held: the rebuild ends now
    w.machine.moved(move, "node-b", 2)
    assert _seqs(_only_batch(w.actions())) == [("runs/a", 1)]


def test_a_replayed_call_in_doubt_moves_the_run_again_and_late_answers_are_ignored():
    w = World()
    run = w.run("runs/a")
    done = _finished_steps(w, run, 1)
    w.machine.node_lost("node-a")
    (move,) = w.actions()
    w.machine.moved(move, "node-b", 2, [(op, op.seq_id) for op in done])
    replay = _only_batch(w.actions())
    w.answer(replay, UNREACHABLE)
    assert w.actions() == [] and "runs/a" in w.machine.moving
    (again,) = w.actions(2.0)
    assert isinstance(again, Move) and again.run is run
    w.machine.moved(again, "node-c", 3, [(op, op.seq_id) for op in done])
    redo = _only_batch(w.actions())
    assert redo.node_id == "node-c" and redo.items[0].fence.epoch == 3
    w.answer(redo)
    assert "runs/a" not in w.machine.moving


def test_a_replayed_load_goes_out_alone_in_its_turn():
    w = World()
    run = w.run("runs/a")
    fb = w.submit(run, 1)
    w.answer(_only_batch(w.actions()))
    load = w.submit(run, 2, OpKind.LOAD_STATE, payload=LoadRequest("tunemesh://x/ck", True))
    (single,) = w.actions()
    w.machine.complete_single(single, ItemOutcome(result=LoadResult("tunemesh://x/ck", 3), epoch=1))
    w.machine.node_lost("node-a")
    (move,) = w.actions()
    w.machine.moved(move, "node-b", 2, [(fb, "fb"), (load, load.payload)])
    w.answer(_only_batch(w.actions()))
    (replayed_load,) = w.actions()
    assert isinstance(replayed_load, Single) and replayed_load.op.payload == load.payload
    assert "runs/a" in w.machine.moving
    w.machine.complete_single(replayed_load, ItemOutcome(result=LoadResult("tunemesh://x/ck", 3), epoch=2))
    assert "runs/a" not in w.machine.moving and run.step == 3
