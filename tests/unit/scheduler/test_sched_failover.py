"""Failover: automatic snapshots of runs, and moving the runs of a trainer that is gone
(or lost an adapter) to another one, where they are loaded and their log replayed."""

import asyncio
import itertools

import pytest
from scheduler_fakes import FakePlacement, FakeTrainer, Mesh, settle

from tunemesh.errors import Code, ResourceExhaustedError, UnavailableError
from tunemesh_scheduler.core import (
    ItemOutcome, LoadRequest, OperationError, OpKind, OpState, SchedulerConfig, SchedulerCore,
)
from tunemesh_scheduler.core.ports import Fence, SnapshotTarget
from tunemesh_scheduler.core.store import MemoryRunStore

FB, FWD, OPTIM, LOAD = OpKind.FORWARD_BACKWARD, OpKind.FORWARD, OpKind.OPTIM_STEP, OpKind.LOAD_STATE
BAD = OperationError(int(Code.INVALID_ARGUMENT), "BAD_DATUM", "rejected by the trainer")
GONE = UnavailableError("TRAINER_UNAVAILABLE", "node-a does not answer")
LOST = OperationError(int(Code.NOT_FOUND), "ADAPTER_NOT_FOUND", "no such adapter on this trainer")


async def _start(store=None, clock=lambda: 1000.0, **config) -> tuple[Mesh, MemoryRunStore]:
    """A started core journaling to a MemoryRunStore (pass store=False for none);
    unreachable trainers and failed moves are retried at the next loop turn."""
    store = MemoryRunStore() if store is None else (store or None)
    counter = itertools.count(1)
    placement, trainer = FakePlacement(), FakeTrainer()
    core = SchedulerCore(placement, trainer, SchedulerConfig(**{"unreachable_retry_s": 0, **config}),
                         clock=clock, new_id=lambda: f"id{next(counter)}", store=store, move_retry_s=0.0)
    await core.start()
    return Mesh(core, placement, trainer), store


async def _one_run(**config) -> tuple[Mesh, FakeTrainer, str]:
    """A started core (as `_start`) with one run on node-a."""
    mesh, _ = await _start(**config)
    return mesh, mesh.trainer, await mesh.new_run()


async def _until(predicate, rounds: int = 500) -> None:
    """Turn the loop until `predicate()` holds (no clock involved)."""
    for _ in range(rounds):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"not reached in {rounds} loop turns")


async def _steps(mesh: Mesh, run: str, kinds, first: int = 1) -> list:
    """Submit `kinds` as seq_ids first, first+1, ... one after the other, each waited for."""
    ops = []
    for seq, kind in enumerate(kinds, first):
        op = await mesh.submit(run, seq, kind=kind, tokens=0 if kind is OPTIM else 10)
        await mesh.wait_all([op])
        ops.append(op)
    return ops


def _snapshot_of(run: str, seq_id: int) -> str:
    return f"tunemesh://{run}/state/snapshot-{seq_id:012d}"


def _sent_snapshots(trainer: FakeTrainer, run: str) -> dict[int, SnapshotTarget | None]:
    """seq_id -> the snapshot its OPTIM_STEP asked for, as last sent."""
    return {item.fence.seq_id: item.snapshot for _, items in trainer.batches for item in items
            if item.run_name == run and item.kind is OPTIM}


def _applied(trainer: FakeTrainer, node: str, run: str) -> list[tuple[OpKind, Fence, object]]:
    """(kind, fence, payload) of what `node` applied to `run` (items and loads), in order."""
    return [(kind, fence, payload) for n, r, kind, fence, payload in trainer.trace if (n, r) == (node, run)]


def _sent_to(trainer: FakeTrainer, node: str, run: str, seq_id: int, since: int = 0) -> int:
    """How many batches sent to `node` since batches[since] held `run`'s `seq_id`."""
    return sum(n == node and any((i.run_name, i.fence.seq_id) == (run, seq_id) for i in items)
               for n, items in trainer.batches[since:])


def _kept(store: MemoryRunStore, run: str) -> list[int]:
    return sorted(seq for r, seq in store.kept_payloads if r == run)


# ---- snapshots --------------------------------------------------------------------------


def test_every_second_optim_step_takes_a_snapshot_that_trims_the_kept_calls():
    async def main():
        mesh, store = await _start(snapshot_every_steps=2)
        run = await mesh.new_run()
        await _steps(mesh, run, [FB, OPTIM, FB, OPTIM])
        first = _snapshot_of(run, 4)
        assert first.endswith("/state/snapshot-000000000004")
        assert _sent_snapshots(mesh.trainer, run) == {2: None, 4: SnapshotTarget(first, "t1")}
        await _until(lambda: getattr(mesh.trainer, "snapshots", []) == [("node-a", run, 4)])
        record = mesh.core.get_run("t1", run)
        assert (record.snapshot_path, record.snapshot_seq_id) == (first, 4)
        await mesh.core.sync()
        assert _kept(store, run) == []  # the snapshot covers calls 1..4
        stored = store.records[("RunRecord", run)]
        assert (stored.snapshot_path, stored.snapshot_seq_id) == (first, 4)
        assert getattr(mesh.trainer, "deleted_checkpoints", []) == []

        await _steps(mesh, run, [FB, OPTIM, FB], first=5)
        await mesh.core.sync()
        assert _kept(store, run) == [5, 6, 7]
        await _steps(mesh, run, [OPTIM], first=8)
        second = _snapshot_of(run, 8)
        assert _sent_snapshots(mesh.trainer, run) == {2: None, 4: SnapshotTarget(first, "t1"), 6: None,
                                                      8: SnapshotTarget(second, "t1")}
        await _until(lambda: getattr(mesh.trainer, "deleted_checkpoints", []) == [("t1", first)])
        assert (record.snapshot_path, record.snapshot_seq_id) == (second, 8)
        await mesh.core.sync()
        assert _kept(store, run) == []

    asyncio.run(main())


def test_at_most_two_snapshots_of_a_run_are_written_at_once():
    """With steps pipelined the next step's snapshot is asked for while the last one is
    still being written; a third waits. Once written, the older is superseded and deleted."""
    async def main():
        mesh, _ = await _start(snapshot_every_steps=1)
        run = await mesh.new_run()
        mesh.trainer.snapshot_hold = asyncio.Event()
        await _steps(mesh, run, [OPTIM, OPTIM, OPTIM, OPTIM])
        await settle()
        assert mesh.trainer.snapshot_calls == [("node-a", run, 1), ("node-a", run, 2)]
        assert _sent_snapshots(mesh.trainer, run) == {1: SnapshotTarget(_snapshot_of(run, 1), "t1"),
                                                      2: SnapshotTarget(_snapshot_of(run, 2), "t1"),
                                                      3: None, 4: None}
        assert mesh.core.get_run("t1", run).snapshot_path == ""  # not confirmed yet
        mesh.trainer.snapshot_hold.set()
        await _until(lambda: mesh.core.get_run("t1", run).snapshot_seq_id == 2)
        await _until(lambda: getattr(mesh.trainer, "deleted_checkpoints", []) == [("t1", _snapshot_of(run, 1))])
        await _steps(mesh, run, [OPTIM], first=5)
        assert _sent_snapshots(mesh.trainer, run)[5] == SnapshotTarget(_snapshot_of(run, 5), "t1")

    asyncio.run(main())


def test_a_failed_snapshot_keeps_the_previous_one_and_the_kept_calls():
    async def main():
        mesh, store = await _start(snapshot_every_steps=1)
        run = await mesh.new_run()
        record = mesh.core.get_run("t1", run)
        await _steps(mesh, run, [OPTIM])
        await _until(lambda: record.snapshot_seq_id == 1)
        mesh.trainer.snapshot_errors[2] = UnavailableError("CHECKPOINT_UNAVAILABLE", "write failed")
        await _steps(mesh, run, [OPTIM], first=2)
        await _until(lambda: ("node-a", run, 2) in mesh.trainer.snapshot_calls)
        await settle()
        await mesh.core.sync()
        assert (record.snapshot_path, record.snapshot_seq_id) == (_snapshot_of(run, 1), 1)
        assert _kept(store, run) == [2]
        assert getattr(mesh.trainer, "deleted_checkpoints", []) == []
        # The next optim step asks again; once it is written the one before is deleted.
        await _steps(mesh, run, [OPTIM], first=3)
        assert _sent_snapshots(mesh.trainer, run)[3] == SnapshotTarget(_snapshot_of(run, 3), "t1")
        await _until(lambda: record.snapshot_seq_id == 3)
        first = ("t1", _snapshot_of(run, 1))
        await _until(lambda: getattr(mesh.trainer, "deleted_checkpoints", []) == [first])

    asyncio.run(main())


def test_a_failed_optim_step_drops_its_snapshot_and_the_next_one_asks_again():
    async def main():
        mesh, _ = await _start(snapshot_every_steps=1)
        run = await mesh.new_run()
        mesh.trainer.item_errors[(run, 1)] = ItemOutcome(error=BAD)
        (failed,) = await _steps(mesh, run, [OPTIM])
        assert failed.state is OpState.FAILED
        await _steps(mesh, run, [OPTIM], first=2)
        assert _sent_snapshots(mesh.trainer, run)[2] == SnapshotTarget(_snapshot_of(run, 2), "t1")
        await _until(lambda: mesh.core.get_run("t1", run).snapshot_seq_id == 2)
        assert mesh.trainer.snapshot_calls == [("node-a", run, 2)]

    asyncio.run(main())


def test_a_snapshot_is_due_after_every_s_seconds():
    async def main():
        now = [1000.0]
        mesh, _ = await _start(clock=lambda: now[0], snapshot_every_steps=0, snapshot_every_s=10)
        run = await mesh.new_run()
        for seq, at in enumerate([1000.0, 1005.0, 1010.0, 1015.0, 1019.0, 1021.0], 1):
            now[0] = at
            await _steps(mesh, run, [OPTIM], first=seq)
            await settle()  # a snapshot asked for is confirmed at this time
        asked = {seq for seq, target in _sent_snapshots(mesh.trainer, run).items() if target}
        assert asked == {3, 6}

    asyncio.run(main())


# Rounds count from the run's first. 1 s / 3 s rounds, budget 8 s: at seq_id 6, 1 + 3 + 1 +
# 3 + 1 = 9 s; seq_id 6's own 3 s round is covered by its snapshot, so the next asks at
# seq_id 12, not at 10. 2 s / 2 s rounds, budget 11 s: at seq_id 6, 10 s and one more 2 s
# round would pass 11 (the rounds alone pass it only at seq_id 8). 3 s / 1 s rounds, budget
# 7 s: at seq_id 4, 3 + 1 + 3 = 7 s counted from the first round (from the first
# optim_step, 4 s: the ask would come at seq_id 6), and every second step after.
@pytest.mark.parametrize("fb_s, optim_s, budget_s, asks", [
    (1.0, 3.0, 8.0, [6, 12]), (2.0, 2.0, 11.0, [6, 12]), (3.0, 1.0, 7.0, [4, 8, 12, 16])])
def test_a_snapshot_is_due_before_the_runs_rounds_pass_the_replay_budget(fb_s, optim_s, budget_s, asks):
    async def main():
        now = [1000.0]
        mesh, _ = await _start(clock=lambda: now[0], snapshot_every_steps=0, snapshot_every_s=0,
                               snapshot_replay_budget_s=budget_s)
        trainer = mesh.trainer

        async def round_of(seconds: float) -> None:
            """Let the held round out once `seconds` passed, holding the next one."""
            held, trainer.hold = trainer.hold, asyncio.Event()
            now[0] += seconds
            held.set()

        run = await mesh.new_run()
        for step in range(8):  # a forward_backward round, then an optim_step round
            trainer.hold, sent = asyncio.Event(), len(trainer.batches)
            ops = [await mesh.submit(run, 2 * step + 1), await mesh.submit(run, 2 * step + 2, kind=OPTIM, tokens=0)]
            await _until(lambda: len(trainer.batches) == sent + 1)
            await round_of(fb_s)
            await _until(lambda: len(trainer.batches) == sent + 2)
            await round_of(optim_s)
            trainer.hold.set()
            await mesh.wait_all(ops)
            await settle()  # a snapshot asked for is confirmed now
        asked = sorted(seq for seq, target in _sent_snapshots(trainer, run).items() if target)
        assert asked == asks

    asyncio.run(main())


@pytest.mark.parametrize("store", [True, False], ids=["never-by-config", "no-store"])
def test_no_snapshots_when_switched_off_or_without_a_store(store):
    async def main():
        config = {"snapshot_every_steps": 0, "snapshot_every_s": 0} if store else {"snapshot_every_steps": 1}
        mesh, kept = await _start(None if store else False, **config)
        run = await mesh.new_run()
        await _steps(mesh, run, [FB, OPTIM] * 4)
        await settle()
        assert set(_sent_snapshots(mesh.trainer, run).values()) == {None}
        assert mesh.trainer.snapshot_calls == []
        assert mesh.core.get_run("t1", run).snapshot_path == ""
        if store:
            await mesh.core.sync()
            assert _kept(kept, run) == list(range(1, 9))

    asyncio.run(main())


def test_without_a_store_nothing_moves():
    async def main():
        mesh, _ = await _start(False)
        run = await mesh.new_run()
        await _steps(mesh, run, [FB, OPTIM])
        mesh.placement.node = "node-b"
        mesh.core.node_lost("node-a")
        mesh.trainer.item_errors[(run, 3)] = ItemOutcome(error=LOST)
        (lost,) = await _steps(mesh, run, [FB], first=3)
        await settle()
        assert (lost.state, lost.error) == (OpState.FAILED, LOST)  # no move to send it after
        assert mesh.placement.move_attempts == []
        assert mesh.trainer.adapters == [("node-a", run)]
        assert mesh.core.get_run("t1", run).node_id == "node-a"
        assert [n for n, *_ in mesh.trainer.trace] == ["node-a"] * 3

    asyncio.run(main())


# ---- moves ------------------------------------------------------------------------------


def test_the_runs_of_a_lost_trainer_move_load_their_snapshot_and_replay_the_log():
    async def main():
        mesh, store = await _start(snapshot_every_steps=2, recover_alone=False)  # replays fused
        trainer = mesh.trainer
        r1, r2 = await mesh.new_run(), await mesh.new_run()
        r3 = await mesh.new_run(node="node-c")
        ckpt = LoadRequest("tunemesh://runs/other/state/ckpt", True)
        trainer.item_errors[(r1, 8)] = ItemOutcome(error=BAD)
        await _steps(mesh, r1, [FB, OPTIM, FB, OPTIM])  # snapshot after seq_id 4
        await _until(lambda: mesh.core.get_run("t1", r1).snapshot_seq_id == 4)
        before = await _steps(mesh, r1, [FB, OPTIM, FWD, FB], first=5)
        before.append(await mesh.submit(r1, 9, kind=LOAD, payload=ckpt, tokens=0))
        before += await _steps(mesh, r2, [FB, OPTIM])
        await mesh.wait_all(before)
        assert before[3].state is OpState.FAILED  # seq_id 8: not replayed

        # node-a stops answering: its calls are parked and sent again, never failed.
        trainer.batch_error["node-a"] = GONE
        sent = len(trainer.batches)
        pending = [await mesh.submit(r1, seq, kind=kind, tokens=0 if kind is OPTIM else 10)
                   for seq, kind in [(10, FB), (11, OPTIM), (12, FB)]] + [await mesh.submit(r2, 3)]
        elsewhere = await mesh.submit(r3, 1)
        await _until(lambda: _sent_to(trainer, "node-a", r1, 10, sent) >= 3)
        assert {op.state for op in pending} <= {OpState.QUEUED, OpState.RUNNING}
        await mesh.wait_all([elsewhere])

        mesh.placement.node = "node-b"
        mesh.core.node_lost("node-a")
        await mesh.wait_all(pending)
        assert [(op.state, op.error) for op in pending] == [(OpState.SUCCEEDED, None)] * 4
        assert pending[0].result == ("ok", (r1, 10))
        assert sorted(mesh.placement.moved) == sorted([(r1, "node-a", "node-b"), (r2, "node-a", "node-b")])
        for run in (r1, r2):
            record = mesh.core.get_run("t1", run)
            assert (record.node_id, record.epoch) == ("node-b", 2)
            assert ("node-b", run) in trainer.adapters and trainer.epochs[run] == 2
        assert (mesh.core.get_run("t1", r3).node_id, mesh.core.get_run("t1", r3).epoch) == ("node-c", 1)
        assert _applied(trainer, "node-b", r1) == [
            (LOAD, Fence(0, 2), LoadRequest(_snapshot_of(r1, 4), True)),  # the snapshot
            (FB, Fence(5, 2), (r1, 5)), (OPTIM, Fence(6, 2), (r1, 6)), (LOAD, Fence(9, 2), ckpt),  # replay
            (FB, Fence(10, 2), (r1, 10)), (OPTIM, Fence(11, 2), (r1, 11)), (FB, Fence(12, 2), (r1, 12)),
        ]
        assert _applied(trainer, "node-b", r2) == [
            (FB, Fence(1, 2), (r2, 1)), (OPTIM, Fence(2, 2), (r2, 2)), (FB, Fence(3, 2), (r2, 3))]
        # The replays of both runs went out fused, each forward_backward with its optim_step
        # (one trainer round per replayed step, as in dispatch).
        first_on_b = next(items for node, items in trainer.batches if node == "node-b")
        assert [(item.run_name, item.fence.seq_id) for item in first_on_b] == [(r1, 5), (r2, 1), (r1, 6), (r2, 2)]
        assert mesh.core.get_run("t1", r1).last_seq_id == 12
        assert mesh.core.snapshot()["operations_by_state"] == {"SUCCEEDED": 15, "FAILED": 1}

    asyncio.run(main())


def test_a_run_moves_from_a_snapshot_its_dead_trainer_wrote_without_confirming_it():
    """The trainer committed the snapshot after step 4 and died before the scheduler heard
    of it: the move starts there (nothing before it is replayed), and the run's older
    snapshot is deleted. The one after step 6 never reached the store: not used."""
    async def main():
        mesh, store = await _start(snapshot_every_steps=1)
        trainer = mesh.trainer
        run = await mesh.new_run()
        await _steps(mesh, run, [FB, OPTIM])
        await _until(lambda: mesh.core.get_run("t1", run).snapshot_seq_id == 2)
        trainer.snapshot_hold = asyncio.Event()  # confirmations never come from here on
        await _steps(mesh, run, [FB, OPTIM, FB, OPTIM], first=3)
        trainer.stored = {_snapshot_of(run, 4)}
        trainer.batch_error["node-a"] = GONE  # dead
        waiting = await mesh.submit(run, 7)
        mesh.placement.node = "node-b"
        mesh.core.node_lost("node-a")
        await mesh.wait_all([waiting])
        assert waiting.state is OpState.SUCCEEDED
        assert _applied(trainer, "node-b", run) == [
            (LOAD, Fence(0, 2), LoadRequest(_snapshot_of(run, 4), True)),
            (FB, Fence(5, 2), (run, 5)), (OPTIM, Fence(6, 2), (run, 6)),  # replayed after it
            (FB, Fence(7, 2), (run, 7))]
        record = mesh.core.get_run("t1", run)
        assert (record.snapshot_path, record.snapshot_seq_id) == (_snapshot_of(run, 4), 4)
        await _until(lambda: ("t1", _snapshot_of(run, 2)) in getattr(trainer, "deleted_checkpoints", []))
        await mesh.core.sync()
        assert _kept(store, run) == [5, 6, 7]
        trainer.snapshot_hold.set()

    asyncio.run(main())


def test_a_deleted_run_leaves_no_snapshot_behind():
    async def main():
        mesh, trainer, run = await _one_run(snapshot_every_steps=1)
        await _steps(mesh, run, [OPTIM])
        await _until(lambda: mesh.core.get_run("t1", run).snapshot_seq_id == 1)
        trainer.snapshot_hold = asyncio.Event()
        await _steps(mesh, run, [OPTIM], first=2)  # its snapshot is still being written
        await mesh.core.delete_run("t1", run)
        assert ("t1", _snapshot_of(run, 1)) in getattr(trainer, "deleted_checkpoints", [])
        trainer.snapshot_hold.set()
        await _until(lambda: ("t1", _snapshot_of(run, 2)) in getattr(trainer, "deleted_checkpoints", []))

    asyncio.run(main())


def test_a_trainer_receiving_a_moved_run_holds_its_next_round_for_the_rebuild():
    async def main():
        now = [1000.0]
        mesh, _ = await _start(clock=lambda: now[0], snapshot_every_steps=0, recover_alone=False)
        trainer = mesh.trainer
        r1, r3 = await mesh.new_run(), await mesh.new_run()
        r2 = await mesh.new_run(node="node-b")
        await _steps(mesh, r1, [FB, OPTIM])

        def rebuilding(run: str):
            return lambda: ("node-b", run) in getattr(trainer, "deleted", [])  # the restore's first call

        trainer.adapter_hold = asyncio.Event()  # node-b rebuilds r1 until this is set
        mesh.placement.node = "node-b"
        mesh.core.relocate(r1)
        await _until(rebuilding(r1))
        sent = len(trainer.batches)
        live = await mesh.submit(r2, 1)
        await settle()
        assert len(trainer.batches) == sent  # held while the rebuild is out
        trainer.adapter_hold.set()
        await mesh.wait_all([live])
        _, first = trainer.batches[sent]
        assert {(i.run_name, i.fence.seq_id) for i in first} == {(r2, 1), (r1, 1), (r1, 2)}  # the replay rides along

        # A rebuild that does not end holds the node for restore_hold_s (5 s) only.
        trainer.adapter_hold = asyncio.Event()
        mesh.core.relocate(r3)
        await _until(rebuilding(r3))
        sent = len(trainer.batches)
        live = await mesh.submit(r2, 2)
        await settle()
        now[0] += 4.9
        mesh.core.tick()
        await settle()
        assert len(trainer.batches) == sent
        now[0] += 0.1
        mesh.core.tick()
        await mesh.wait_all([live])
        assert [(i.run_name, i.fence.seq_id) for i in trainer.batches[sent][1]] == [(r2, 2)]
        trainer.adapter_hold.set()

    asyncio.run(main())


def test_a_result_from_the_old_trainer_after_the_move_is_not_taken():
    async def main():
        mesh, _ = await _start()
        trainer = mesh.trainer
        run = await mesh.new_run()
        await _steps(mesh, run, [FB, OPTIM])
        trainer.node_hold["node-a"] = old = asyncio.Event()
        late = await mesh.submit(run, 3)
        await _until(lambda: late.state is OpState.RUNNING)
        after = await mesh.submit(run, 4, kind=OPTIM, tokens=0)
        mesh.placement.node = "node-b"
        mesh.core.node_lost("node-a")
        await _until(lambda: mesh.core.get_run("t1", run).node_id == "node-b" and not mesh.core.machine.moving)
        assert [(k, f) for k, f, _ in _applied(trainer, "node-b", run)] == [(FB, Fence(1, 2)),
                                                                           (OPTIM, Fence(2, 2))]

        trainer.node_hold["node-b"] = new = asyncio.Event()
        old.set()  # node-a answers seq_id 3, fenced with the old epoch
        await _until(lambda: _sent_to(trainer, "node-b", run, 3) == 1)
        assert late.state is OpState.RUNNING and late.result is None  # its answer was not taken
        new.set()
        await mesh.wait_all([late, after])
        assert (late.state, late.result) == (OpState.SUCCEEDED, ("ok", (run, 3)))
        assert after.state is OpState.SUCCEEDED
        assert [f.seq_id for k, f, _ in _applied(trainer, "node-a", run)] == [1, 2, 3]
        assert [f for k, f, _ in _applied(trainer, "node-b", run)] == [Fence(1, 2), Fence(2, 2), Fence(3, 2),
                                                                       Fence(4, 2)]
        assert mesh.core.get_run("t1", run).step == 2

    asyncio.run(main())


def test_a_lost_adapter_moves_the_run_and_ops_submitted_meanwhile_wait_for_it():
    async def main():
        mesh, _ = await _start()
        trainer = mesh.trainer
        run = await mesh.new_run()
        await _steps(mesh, run, [FB, OPTIM])
        trainer.item_errors[(run, 3)] = ItemOutcome(error=LOST)
        mesh.placement.move_hold = go = asyncio.Event()
        mesh.placement.node = "node-b"
        lost = await mesh.submit(run, 3)
        await _until(lambda: mesh.placement.move_attempts == [(run, "node-a")])
        assert lost.state is OpState.QUEUED
        sent = len(trainer.batches)
        meanwhile = await mesh.submit(run, 4, kind=OPTIM, tokens=0)
        await settle()
        assert (len(trainer.batches), meanwhile.state) == (sent, OpState.QUEUED)  # nothing goes out
        del trainer.item_errors[(run, 3)]  # node-b has the adapter
        go.set()
        await mesh.wait_all([lost, meanwhile])
        assert (lost.state, meanwhile.state) == (OpState.SUCCEEDED, OpState.SUCCEEDED)
        assert mesh.placement.moved == [(run, "node-a", "node-b")]
        record = mesh.core.get_run("t1", run)
        assert (record.node_id, record.epoch, record.step) == ("node-b", 2, 2)
        assert [f for k, f, _ in _applied(trainer, "node-b", run)] == [Fence(s, 2) for s in (1, 2, 3, 4)]

    asyncio.run(main())


def test_a_rejoining_trainer_frees_only_the_adapters_of_runs_that_moved_away():
    async def main():
        mesh, _ = await _start()
        trainer = mesh.trainer
        moved, stayed = await mesh.new_run(), await mesh.new_run()
        moving = await mesh.new_run(node="node-c")
        trainer.adapters.append(("node-a", "runs/unknown"))
        mesh.placement.node = "node-b"
        trainer.once_item_errors[("node-a", (moved, 1))] = ItemOutcome(error=LOST)  # node-a lost it
        await _steps(mesh, moved, [FB])
        assert mesh.core.get_run("t1", moved).node_id == "node-b"
        trainer.adapters.append(("node-a", moving))  # moving from node-c to node-a, not yet done
        mesh.placement.move_hold = asyncio.Event()
        mesh.core.node_lost("node-c")
        await _until(lambda: moving in mesh.core.machine.moving)
        trainer.deleted = []
        mesh.core.node_joined("node-a")
        await settle()
        assert trainer.deleted == [("node-a", moved)]
        assert stayed in await trainer.list_adapters("node-a")

    asyncio.run(main())


def test_a_move_without_capacity_is_retried_until_it_succeeds():
    async def main():
        mesh, _ = await _start()
        trainer = mesh.trainer
        run = await mesh.new_run()
        await _steps(mesh, run, [FB, OPTIM])
        trainer.batch_error["node-a"] = GONE
        ops = [await mesh.submit(run, 3), await mesh.submit(run, 4, kind=OPTIM, tokens=0)]
        mesh.placement.move_error = ResourceExhaustedError("NO_CAPACITY", "no trainer of tiny has a free slot")
        mesh.core.node_lost("node-a")
        await _until(lambda: len(mesh.placement.move_attempts) >= 3)
        assert {op.state for op in ops} == {OpState.QUEUED}
        assert mesh.core.get_run("t1", run).node_id == "node-a"
        mesh.placement.node, mesh.placement.move_error = "node-b", None
        await mesh.wait_all(ops)
        assert [(op.state, op.error) for op in ops] == [(OpState.SUCCEEDED, None)] * 2
        record = mesh.core.get_run("t1", run)
        assert (record.node_id, record.epoch, record.last_seq_id) == ("node-b", 2, 4)
        assert [f for k, f, _ in _applied(trainer, "node-b", run)] == [Fence(s, 2) for s in (1, 2, 3, 4)]

    asyncio.run(main())


# ---- known bugs -------------------------------------------------------------------------


def test_queue_counts_per_node_follow_the_operations_that_moved():
    async def main():
        mesh, _ = await _start()
        run = await mesh.new_run()
        await _steps(mesh, run, [FB])
        mesh.trainer.batch_error["node-a"] = GONE
        ops = [await mesh.submit(run, 2), await mesh.submit(run, 3)]
        mesh.placement.node = "node-b"
        mesh.core.node_lost("node-a")
        await mesh.wait_all(ops)
        assert mesh.core.snapshot()["queued_by_node"] == {}

    asyncio.run(main())


def test_a_snapshot_confirmed_during_a_move_does_not_skip_replayed_calls():
    async def main():
        mesh, trainer, run = await _one_run(snapshot_every_steps=2)
        record = mesh.core.get_run("t1", run)
        await _steps(mesh, run, [FB, OPTIM, FB, OPTIM])  # snapshot after seq_id 4
        await _until(lambda: record.snapshot_seq_id == 4)
        trainer.snapshot_hold = written = asyncio.Event()
        await _steps(mesh, run, [FB, OPTIM, FB, OPTIM], first=5)  # asks for one after 8
        trainer.load_hold = loaded = asyncio.Event()
        mesh.placement.node = "node-b"
        mesh.core.node_lost("node-a")
        await _until(lambda: len(trainer.loads) == 1)  # node-b loads the snapshot after 4 ...
        written.set()  # ... while the one after 8 is written: not taken mid-move
        for _ in range(50):
            await asyncio.sleep(0)
        assert record.snapshot_seq_id == 4
        assert not any(path.endswith("snapshot-000000000004") for _, path in getattr(trainer, "deleted_checkpoints", []))
        loaded.set()
        await _until(lambda: not mesh.core.machine.moving)
        applied = _applied(trainer, "node-b", run)
        last_load = max(i for i, (kind, fence, _) in enumerate(applied) if kind is LOAD and fence.seq_id == 0)
        covered = {_snapshot_of(run, 4): 4, _snapshot_of(run, 8): 8}[applied[last_load][2].path]
        # node-b holds the run's state after seq_id 8: the snapshot it loaded plus the rest.
        assert [f.seq_id for _, f, _ in applied[last_load + 1:]] == list(range(covered + 1, 9))

    asyncio.run(main())


def test_a_replayed_call_that_fails_in_doubt_does_not_end_the_move():
    async def main():
        mesh, _ = await _start()
        trainer = mesh.trainer
        run = await mesh.new_run()
        await _steps(mesh, run, [FB, OPTIM])
        trainer.once_item_errors[("node-b", (run, 1))] = ItemOutcome(
            error=OperationError(int(Code.UNAVAILABLE), "TRAINER_UNAVAILABLE", "node-b went away"))
        mesh.placement.node = "node-b"
        mesh.core.node_lost("node-a")
        nxt = await mesh.submit(run, 3)
        await mesh.wait_all([nxt])
        applied = [f.seq_id for _, f, _ in _applied(trainer, "node-b", run)]
        before_next = applied[:applied.index(3)]
        # seq_id 1 did not (certainly) apply on node-b: it goes again, and 2 after it,
        # before the run serves seq_id 3 there.
        assert before_next.count(1) == 2 and before_next[-2:] == [1, 2]

    asyncio.run(main())


def test_a_run_released_twice_holds_one_place_and_the_dispatcher_goes_on():
    """A parked head can be released both by its retry and by the end of its run's move:
    the node's queue holds it once, and the node's dispatcher keeps sending batches."""
    from tunemesh_scheduler.core.fairness import FairQueue
    from tunemesh_scheduler.core.records import OperationRecord

    queue = FairQueue()
    op = OperationRecord(name="operations/o", tenant="t1", run="runs/r", seq_id=1, kind=OpKind.FORWARD,
                         request_id="", payload_digest=b"", num_tokens=3, node_id="node-a", create_time=1.0)
    queue.push(op)
    queue.push(op)
    assert len(queue) == 1
    assert queue.take(100) == [op] and len(queue) == 0 and not queue

    async def main():
        mesh, _ = await _start()
        run = await mesh.new_run()
        first = await mesh.submit(run, 1)
        await mesh.wait_all([first])
        second = await mesh.submit(run, 2)
        mesh.core.machine._release(second)  # a second release of the same head
        await mesh.wait_all([second])
        third = await mesh.submit(run, 3)
        await mesh.wait_all([third])  # the dispatcher still works
        assert [p[1] for _, _, p in mesh.trainer.executed].count(2) >= 1

    asyncio.run(main())
