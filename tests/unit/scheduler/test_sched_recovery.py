"""Crash and recovery: a second core takes over the sessions, runs and operation logs the
first one journaled to its RunStore, and the recovery plan it builds from them."""

import asyncio
import dataclasses
import itertools

import pytest
from scheduler_fakes import FakePlacement, FakeTrainer, Mesh, settle

from tunemesh.errors import AlreadyExistsError, Code, FailedPreconditionError, NotFoundError
from tunemesh_scheduler import takeover
from tunemesh_scheduler.core import (
    ItemOutcome, LoadResult, OperationError, OperationRecord, OpKind, OpState, RunRecord,
    SchedulerConfig, SchedulerCore, SessionRecord,
)
from tunemesh_scheduler.core import recovery
from tunemesh_scheduler.core.ports import StoredState, StoreWrite
from tunemesh_scheduler.core.store import MemoryRunStore

FB, OPTIM = OpKind.FORWARD_BACKWARD, OpKind.OPTIM_STEP
BAD = OperationError(int(Code.INVALID_ARGUMENT), "BAD_DATUM", "rejected by the trainer")


async def _start(store, trainer, prefix: str, clock=lambda: 1000.0, **config) -> Mesh:
    """A started core journaling to `store`; ids are `{prefix}1, {prefix}2, ...` so the
    cores of one test never mint the same name."""
    counter = itertools.count(1)
    placement = FakePlacement()
    core = SchedulerCore(placement, trainer, SchedulerConfig(**config), clock=clock,
                         new_id=lambda: f"{prefix}{next(counter)}", store=store)
    await core.start()
    return Mesh(core, placement, trainer)


async def _crash() -> None:
    """The old scheduler process dies: every task but the test's own stops where it is
    (no stop(), no last journal write, no batch outcome)."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _take_over(store, trainer, prefix: str = "b", **config) -> Mesh:
    """A new scheduler on the same store, in the order `__main__` uses."""
    mesh = await _start(store, trainer, prefix, **config)
    plan = recovery.plan(await store.load())
    await takeover.fence_runs(plan, trainer)
    mesh.core.recover(plan)
    return mesh


def _fences(trainer: FakeTrainer, run: str, since: int) -> list[tuple[int, int]]:
    """(seq_id, epoch) of every item of `run` sent in batches[since:], in order."""
    return [(item.fence.seq_id, item.fence.epoch)
            for _, items in trainer.batches[since:] for item in items if item.run_name == run]


def _stored_ops(state: StoredState, run: str) -> dict[int, OperationRecord]:
    return {op.seq_id: op for op in state.operations if op.run == run}


# ---- crash and recover ------------------------------------------------------------------


def test_a_crashed_scheduler_is_taken_over_from_its_store():
    async def main():
        store, trainer = MemoryRunStore(), FakeTrainer()
        a = await _start(store, trainer, "a")
        s1 = a.core.create_session("t1", {"who": "alice"})
        r1 = (await a.core.create_run("t1", s1.name, "tiny", {"rank": 8}, "create-r1")).name
        s2 = a.core.create_session("t2")
        a.placement.node = "node-b"
        r2 = (await a.core.create_run("t2", s2.name, "tiny", {"rank": 4})).name
        gone = a.core.create_session("t1")
        a.core.end_session("t1", gone.name)

        # Before the crash: r1 seq 1 (fb) and 2 (optim) succeed, 3 fails; r2 seq 1 succeeds.
        trainer.item_errors[(r1, 3)] = ItemOutcome(error=BAD)
        done = [await a.submit(r1, 1, request_id="r1-1"),
                await a.submit(r1, 2, kind=OPTIM, tokens=0, request_id="r1-2"),
                await a.submit(r1, 3, request_id="r1-3"),
                await a.submit(r2, 1, "t2", request_id="r2-1")]
        await a.wait_all(done)
        assert [op.state for op in done] == [OpState.SUCCEEDED, OpState.SUCCEEDED, OpState.FAILED,
                                             OpState.SUCCEEDED]
        # Then the trainer holds: r1 seq 4 and r2 seq 2 are RUNNING, r1 seq 5 and r2 seq 3
        # QUEUED behind them, r1 seq 6 cancelled while queued.
        trainer.hold = asyncio.Event()
        op4 = await a.submit(r1, 4, request_id="r1-4")
        op2b = await a.submit(r2, 2, "t2")
        await settle()
        op5 = await a.submit(r1, 5, kind=OPTIM, tokens=0, request_id="r1-5")
        op6 = await a.submit(r1, 6)
        op3b = await a.submit(r2, 3, "t2")
        a.core.cancel_operation("t1", op6.name)
        assert (op4.state, op2b.state, op5.state, op3b.state, op6.state) == (
            OpState.RUNNING, OpState.RUNNING, OpState.QUEUED, OpState.QUEUED, OpState.CANCELLED)
        assert (a.core.get_run("t1", r1).step, a.core.get_run("t1", r1).last_seq_id) == (1, 3)
        await a.core.sync()
        await _crash()
        sent = len(trainer.batches)
        trainer.hold = None  # the trainer node outlives the scheduler

        b = await _take_over(store, trainer)
        core = b.core
        # Sessions and runs are back, on their nodes, fenced one epoch higher.
        assert core.get_session("t1", s1.name).labels == {"who": "alice"}
        assert core.get_session("t1", gone.name).ended
        run1, run2 = core.get_run("t1", r1), core.get_run("t2", r2)
        assert (run1.node_id, run1.epoch, run1.step, run1.last_seq_id) == ("node-a", 2, 1, 3)
        assert (run2.node_id, run2.epoch, run2.step, run2.last_seq_id) == ("node-b", 2, 0, 1)
        assert trainer.epochs == {r1: 2, r2: 2}
        again = await core.create_run("t1", s1.name, "tiny", {"rank": 8}, "create-r1")
        assert again.name == r1 and b.placement.placed == []

        # Finished operations answer as before and their request ids still dedup.
        first = core.get_operation("t1", done[0].name)
        assert (first.state, first.result) == (OpState.SUCCEEDED, ("ok", (r1, 1)))
        failed = core.get_operation("t1", done[2].name)
        assert (failed.state, failed.error) == (OpState.FAILED, BAD)
        assert core.get_operation("t1", op6.name).state is OpState.CANCELLED
        assert (await b.submit(r1, 1, request_id="r1-1")).name == done[0].name
        assert (await b.submit(r1, 4, request_id="r1-4")).name == op4.name
        with pytest.raises(AlreadyExistsError) as info:
            await b.submit(r1, 8, payload="another call", request_id="r1-1")
        assert info.value.reason == "REQUEST_ID_REUSED"
        with pytest.raises(AlreadyExistsError) as info:
            await b.submit(r1, 2, payload="another call")
        assert info.value.reason == "SEQ_ID_REUSED"

        # The unfinished ones run again, in order, with the new epoch, and complete.
        recovered = [core.get_operation("t1", op4.name), core.get_operation("t1", op5.name),
                     core.get_operation("t2", op2b.name), core.get_operation("t2", op3b.name)]
        await b.wait_all(recovered)
        assert all(op.state is OpState.SUCCEEDED for op in recovered)
        assert recovered[0].result == ("ok", (r1, 4))
        assert _fences(trainer, r1, sent) == [(4, 2), (5, 2)]
        assert _fences(trainer, r2, sent) == [(2, 2), (3, 2)]
        assert (run1.step, run1.last_seq_id) == (2, 6)
        assert (run2.step, run2.last_seq_id) == (0, 3)
        # Later seq_ids continue the run; the cancelled and failed ops stay so.
        op7 = await b.submit(r1, 7, request_id="r1-7")
        await b.wait_all([op7])
        assert _fences(trainer, r1, sent)[-1] == (7, 2)
        assert run1.last_seq_id == 7
        assert core.get_operation("t1", op6.name).state is OpState.CANCELLED
        assert core.get_operation("t1", done[2].name).state is OpState.FAILED
        assert [seq for seq, _ in _fences(trainer, r1, 0)].count(1) == 1  # seq 1 never re-ran

    asyncio.run(main())


def test_a_second_crash_counts_nothing_twice():
    async def main():
        store, trainer = MemoryRunStore(), FakeTrainer()
        a = await _start(store, trainer, "a")
        run = await a.new_run()
        ops = [await a.submit(run, 1), await a.submit(run, 2, kind=OPTIM, tokens=0)]
        await a.wait_all(ops)
        trainer.hold = asyncio.Event()
        await a.submit(run, 3, kind=OPTIM, tokens=0)
        await a.core.sync()
        await _crash()
        trainer.hold = None

        b = await _take_over(store, trainer, "b")
        await b.wait_all([b.core.get_operation("t1", n) for n in [op.name for op in ops]])
        await b.wait_all([await b.submit(run, 4, kind=OPTIM, tokens=0)])
        record = b.core.get_run("t1", run)
        assert (record.step, record.last_seq_id, record.epoch) == (3, 4, 2)
        await b.core.sync()
        await _crash()

        c = await _take_over(store, trainer, "c")
        record = c.core.get_run("t1", run)
        assert (record.step, record.last_seq_id, record.epoch) == (3, 4, 3)
        assert trainer.epochs[run] == 3

    asyncio.run(main())


def test_finishes_a_crash_kept_from_the_store_are_sent_again_and_answer_the_same():
    async def main():
        store, trainer = MemoryRunStore(), FakeTrainer()
        a = await _start(store, trainer, "a", journal_defer_s=3600)  # finishes wait for the next change
        run = await a.new_run()
        trainer.hold = asyncio.Event()
        ops = [await a.submit(run, 1), await a.submit(run, 2, kind=OPTIM, tokens=0)]
        await a.core.sync()  # the submissions are stored; then the trainer answers
        trainer.hold.set()
        await a.wait_all(ops)
        shown = [a.core.get_operation("t1", op.name) for op in ops]
        assert [op.state for op in shown] == [OpState.SUCCEEDED] * 2  # the client holds these results
        assert [op.done for op in _stored_ops(await store.load(), run).values()] == [False, False]
        sent = len(trainer.batches)
        await _crash()

        b = await _take_over(store, trainer, "b")
        again = [await b.core.wait_operation("t1", op.name, 5.0) for op in ops]
        assert [(op.state, op.result) for op in again] == [(op.state, op.result) for op in shown]
        assert _fences(trainer, run, sent) == [(1, 2), (2, 2)]  # sent again under the new epoch
        record = b.core.get_run("t1", run)
        assert (record.step, record.last_seq_id) == (1, 2)

    asyncio.run(main())


def test_results_of_a_store_outage_are_never_shown_and_a_new_leader_rebuilds_the_run():
    async def main():
        store, trainer = MemoryRunStore(), FakeTrainer()
        a = await _start(store, trainer, "a", submit_store_wait_s=0.2)
        run = await a.new_run()
        await a.wait_all([await a.submit(run, 1)])
        await a.core.sync()  # op 1 and its outcome are in the store
        store.down = True  # etcd goes away: training goes on, nothing is stored
        ops = [await a.submit(run, seq) for seq in (2, 3)]
        seen = [await a.core.wait_operation("t1", op.name, 0.2) for op in ops]
        assert [a.core.operations.get("t1", op.name).state for op in ops] == [OpState.SUCCEEDED] * 2
        assert [op.state for op in seen] == [OpState.RUNNING] * 2  # no client holds these results
        assert trainer.applied[run] == 3
        await _crash()  # the leader goes before the store comes back
        store.down = False

        b = await _take_over(store, trainer, "b")
        assert b.core.get_run("t1", run).last_seq_id == 1
        with pytest.raises(NotFoundError):  # the client's wait finds it gone and re-sends it
            b.core.get_operation("t1", ops[0].name)
    asyncio.run(main())


def test_takeover_rebuilds_a_run_whose_adapter_took_seq_ids_the_store_never_heard_of():
    async def main():
        store, trainer = MemoryRunStore(), FakeTrainer()
        a = await _start(store, trainer, "a")
        run = await a.new_run()
        await a.wait_all([await a.submit(run, 1), await a.submit(run, 2)])
        await a.core.sync()
        plan = recovery.plan(await store.load())
        assert await takeover.fence_runs(plan, trainer) == []  # the adapter is where the store says
        trainer.applied[run] = 5  # took 3..5 under a leader that never stored them
        plan = recovery.plan(await store.load())
        assert await takeover.fence_runs(plan, trainer) == [run]
        # seq_ids arrive out of order: 4 and 5 stored, 3 acknowledged unstored, the trainer took all
        plan = recovery.plan(await store.load())
        recovered = plan.runs[0]
        recovered.queued = [dataclasses.replace(recovered.finished[0], seq_id=seq) for seq in (4, 5)]
        assert await takeover.fence_runs(plan, trainer) == [run]
        recovered.queued.append(dataclasses.replace(recovered.finished[0], seq_id=3))
        assert await takeover.fence_runs(plan, trainer) == []  # every seq_id it took is known
    asyncio.run(main())


def test_stop_leaves_unfinished_operations_queued_in_the_store():
    async def main():
        store, trainer = MemoryRunStore(), FakeTrainer()
        a = await _start(store, trainer, "a")
        run = await a.new_run()
        first = await a.submit(run, 1)
        await a.wait_all([first])
        trainer.hold = asyncio.Event()
        running, queued = await a.submit(run, 2), await a.submit(run, 3)
        await settle()
        assert running.state is OpState.RUNNING
        await a.core.stop()
        for op in (running, queued):  # failed here, for this scheduler's waiters ...
            assert (op.state, op.error.reason) == (OpState.FAILED, "SCHEDULER_STOPPING")
        state = await store.load()  # ... but queued for the next one, with their calls
        stored = _stored_ops(state, run)
        assert {seq: op.state for seq, op in stored.items()} == {
            1: OpState.SUCCEEDED, 2: OpState.QUEUED, 3: OpState.QUEUED}
        assert stored[2].error is None
        assert (state.payloads[(run, 2)], state.payloads[(run, 3)]) == ((run, 2), (run, 3))

        trainer.hold = None
        b = await _take_over(store, trainer)
        await b.wait_all([b.core.get_operation("t1", op.name) for op in (running, queued)])
        assert b.core.get_run("t1", run).last_seq_id == 3

    asyncio.run(main())


def test_eviction_compacts_the_log_below_the_run_floor_and_recovery_keeps_the_count():
    async def main():
        now = [1000.0]
        store, trainer = MemoryRunStore(), FakeTrainer()
        a = await _start(store, trainer, "a", clock=lambda: now[0], finished_ttl_s=60.0)
        run = await a.new_run()
        done = [await a.submit(run, 1, request_id="x1"),
                await a.submit(run, 2, kind=OPTIM, tokens=0, request_id="x2"),
                await a.submit(run, 3, request_id="x3")]
        await a.wait_all(done)
        trainer.hold = asyncio.Event()
        op4 = await a.submit(run, 4, kind=OPTIM, tokens=0)
        await settle()
        op5 = await a.submit(run, 5)
        a.core.cancel_operation("t1", op5.name)  # finished, but above last_seq_id = 3
        now[0] += 61.0
        assert a.core.evict_finished() == 4
        await a.core.sync()
        state = await store.load()
        (floor,) = state.runs
        assert (floor.last_seq_id, floor.step) == (3, 1)
        assert {seq: op.state for seq, op in _stored_ops(state, run).items()} == {
            4: OpState.QUEUED, 5: OpState.CANCELLED}
        await _crash()
        trainer.hold = None

        b = await _take_over(store, trainer)
        record = b.core.get_run("t1", run)
        assert (record.last_seq_id, record.step, record.epoch) == (3, 1, 2)
        with pytest.raises(NotFoundError):
            b.core.get_operation("t1", done[0].name)
        with pytest.raises(FailedPreconditionError) as info:
            await b.submit(run, 2, kind=OPTIM, tokens=0, request_id="x2")
        assert info.value.reason == "SEQ_ID_PASSED"
        await b.wait_all([b.core.get_operation("t1", op4.name)])
        assert (record.last_seq_id, record.step) == (5, 2)
        assert b.core.get_operation("t1", op5.name).state is OpState.CANCELLED
        await b.wait_all([await b.submit(run, 6)])
        assert record.last_seq_id == 6

    asyncio.run(main())


def test_recover_drops_lost_and_orphan_records_from_the_store():
    async def main():
        store = MemoryRunStore()
        await store.apply([StoreWrite(_run("runs/r", last_seq_id=2)),
                           StoreWrite(_op("runs/r", 3)),  # its call was too large to keep
                           StoreWrite(_op("runs/r", 2), payload="late"),  # at the floor
                           StoreWrite(_op("runs/gone", 1), payload="orphan")])
        mesh = await _start(store, FakeTrainer(), "b")
        mesh.core.recover(recovery.plan(await store.load()))
        await mesh.core.sync()
        state = await store.load()
        assert state.operations == []
        assert [(r.name, r.epoch) for r in state.runs] == [("runs/r", 2)]

    asyncio.run(main())


# ---- the plan ---------------------------------------------------------------------------


def _run(name: str, *, epoch: int = 1, last_seq_id: int = 0, step: int = 0,
         create_time: float = 1.0) -> RunRecord:
    return RunRecord(name=name, tenant="t1", session="sessions/s", base_model="tiny", lora={},
                     node_id="node-a", create_time=create_time, step=step,
                     last_seq_id=last_seq_id, epoch=epoch, floor=(last_seq_id, step))


def _op(run: str, seq_id: int, kind: OpKind = FB, state: OpState = OpState.QUEUED,
        result=None) -> OperationRecord:
    """An operation record as a store gives it back (its call is kept apart)."""
    return OperationRecord(name=f"operations/{run}-{seq_id}", tenant="t1", run=run, seq_id=seq_id,
                           kind=kind, request_id="", payload_digest=b"d", num_tokens=1, node_id="",
                           create_time=1.0, state=state, result=result,
                           end_time=2.0 if state.done else None)


def _calls(*ops: OperationRecord) -> dict[tuple[str, int], tuple]:
    """Kept calls of `ops`, as StoredState.payloads holds them."""
    return {(op.run, op.seq_id): ("call", op.seq_id) for op in ops}


def test_plan_raises_each_epoch_and_leaves_the_stored_run_as_it_was():
    stored = _run("runs/r", epoch=3)
    plan = recovery.plan(StoredState(runs=[stored]))
    assert plan.runs[0].run.epoch == 4 and stored.epoch == 3
    assert (plan.runs[0].finished, plan.runs[0].queued, plan.runs[0].lost, plan.orphans) == ([], [], [], [])


def test_plan_counts_steps_of_finished_operations_above_the_floor():
    ok = OpState.SUCCEEDED
    ops = [
        _op("runs/r", 1, OPTIM, ok),  # at the floor: already counted in step=5
        _op("runs/r", 3, OPTIM, ok),
        _op("runs/r", 4, OpKind.LOAD_STATE, ok, result=LoadResult("ckpt", 10)),
        _op("runs/r", 5, OPTIM, OpState.FAILED),
        _op("runs/r", 6, OPTIM, OpState.CANCELLED),
        _op("runs/r", 7, OPTIM, ok),
        _op("runs/r", 8, FB, ok),
    ]
    plan = recovery.plan(StoredState(runs=[_run("runs/r", last_seq_id=2, step=5)],
                                     operations=list(reversed(ops))))
    (recovered,) = plan.runs
    assert recovered.run.step == 11
    assert recovered.run.last_seq_id == 2  # the lane advances it over the finished ones
    assert [op.seq_id for op in recovered.finished] == [1, 3, 4, 5, 6, 7, 8]


def test_plan_requeues_unfinished_operations_with_their_payload_in_seq_order():
    ops = [_op("runs/r", 5), _op("runs/r", 4, state=OpState.RUNNING), _op("runs/r", 3)]
    plan = recovery.plan(StoredState(runs=[_run("runs/r", epoch=2, last_seq_id=2)], operations=ops,
                                     payloads=_calls(*ops)))
    (recovered,) = plan.runs
    assert [(op.seq_id, op.payload) for op in recovered.queued] == [
        (3, ("call", 3)), (4, ("call", 4)), (5, ("call", 5))]
    assert all((op.state, op.epoch, op.node_id) == (OpState.QUEUED, 3, "node-a")
               for op in recovered.queued)
    assert recovered.lost == []


def test_plan_loses_unfinished_operations_without_payload_or_at_the_floor():
    ops = [_op("runs/r", 2), _op("runs/r", 3), _op("runs/r", 4)]
    plan = recovery.plan(StoredState(runs=[_run("runs/r", last_seq_id=2)], operations=ops,
                                     payloads=_calls(ops[0], ops[2])))  # 3's call was not kept
    (recovered,) = plan.runs
    assert [op.seq_id for op in recovered.lost] == [2, 3]
    assert [op.seq_id for op in recovered.queued] == [4]


def test_plan_sets_aside_operations_of_unknown_runs_and_orders_by_creation():
    sessions = [SessionRecord("sessions/late", "t1", {}, 9.0, 9.0),
                SessionRecord("sessions/early", "t1", {}, 1.0, 1.0)]
    runs = [_run("runs/late", create_time=9.0), _run("runs/early", create_time=1.0)]
    orphan, late = _op("runs/deleted", 1), _op("runs/late", 1)
    plan = recovery.plan(StoredState(sessions, runs, [orphan, late], _calls(orphan, late)))
    assert plan.orphans == [orphan]
    assert [s.name for s in plan.sessions] == ["sessions/early", "sessions/late"]
    assert [r.run.name for r in plan.runs] == ["runs/early", "runs/late"]
    assert [op.seq_id for op in plan.runs[1].queued] == [1]


# ---- eviction after a takeover ----------------------------------------------------------


def test_eviction_after_recovery_goes_by_end_time_across_runs():
    async def main():
        store = MemoryRunStore()
        newer = dataclasses.replace(_op("runs/a", 1, state=OpState.SUCCEEDED), end_time=2000.0)
        older = dataclasses.replace(_op("runs/b", 1, state=OpState.SUCCEEDED), end_time=1000.0)
        await store.apply([StoreWrite(_run("runs/a", create_time=1.0)),
                           StoreWrite(_run("runs/b", create_time=2.0)),
                           StoreWrite(newer), StoreWrite(older)])
        mesh = await _start(store, FakeTrainer(), "b", clock=lambda: 1061.0, finished_ttl_s=60.0)
        mesh.core.recover(recovery.plan(await store.load()))
        assert mesh.core.evict_finished() == 1  # runs/b's op ended 61 s ago, runs/a's not yet
        with pytest.raises(NotFoundError):
            mesh.core.get_operation("t1", older.name)

    asyncio.run(main())


def test_records_evicted_above_the_floor_are_compacted_once_the_floor_passes_them():
    async def main():
        now = [1000.0]
        store, trainer = MemoryRunStore(), FakeTrainer()
        a = await _start(store, trainer, "a", clock=lambda: now[0], finished_ttl_s=60.0)
        run = await a.new_run()
        trainer.hold = asyncio.Event()
        first = await a.submit(run, 1)
        await settle()
        second = await a.submit(run, 2)
        a.core.cancel_operation("t1", second.name)
        now[0] += 61.0
        assert a.core.evict_finished() == 1  # seq 2, above last_seq_id = 0
        trainer.hold.set()
        await a.wait_all([first])
        now[0] += 61.0
        assert a.core.evict_finished() == 1  # seq 1; last_seq_id is now 2
        await a.core.sync()
        state = await store.load()
        assert state.runs[0].last_seq_id == 2
        assert _stored_ops(state, run) == {}

    asyncio.run(main())


def test_a_run_noted_before_its_ops_finish_records_cannot_pass_them() -> None:
    """The store keeps a run's floor, not its live counters: a run record written while
    an operation had finished in memory but not yet in the log must not make a restarted
    scheduler treat that operation as passed (its re-send would fail SEQ_ID_PASSED)."""

    async def scenario() -> None:
        store = MemoryRunStore()
        run = _run("runs/r")
        op = OperationRecord(name="operations/o1", tenant="t1", run="runs/r", seq_id=1,
                             kind=OpKind.FORWARD_BACKWARD, request_id="req-1", payload_digest=b"d",
                             num_tokens=3, node_id="node-a", create_time=1.0)
        await store.apply([StoreWrite(run), StoreWrite(op, payload=("runs/r", 1))])
        run.last_seq_id, run.step = 1, 0  # op 1 finished in memory; its record not yet written
        await store.apply([StoreWrite(run)])  # e.g. a snapshot or a move noted the run
        plan = recovery.plan(await store.load())
        (recovered,) = plan.runs
        assert recovered.run.last_seq_id == 0
        assert [o.seq_id for o in recovered.queued] == [1] and not recovered.lost

    asyncio.run(scenario())


def test_a_taken_over_run_reports_its_latest_logged_operation_as_its_last_request():
    """The last request time is not stored; a new scheduler takes the latest of the run's
    logged operations, not the run's creation time."""
    from tunemesh_scheduler import convert

    async def main():
        store, trainer, now = MemoryRunStore(), FakeTrainer(), [1000.0]
        a = await _start(store, trainer, "a", clock=lambda: now[0])
        session = a.core.create_session("t1")
        run = (await a.core.create_run("t1", session.name, "tiny", {"rank": 8})).name
        ops = []
        for seq, at in ((1, 1010.0), (2, 1020.0)):
            now[0] = at
            ops.append(await a.submit(run, seq))
        await a.wait_all(ops)
        await a.core.sync()
        await _crash()
        now[0] = 2000.0
        b = await _take_over(store, trainer, clock=lambda: now[0])
        record = b.core.get_run("t1", run)
        assert (convert.run(record).owner, convert.run(record).last_request_time.ToSeconds()) == ("t1", 1020)

    asyncio.run(main())
