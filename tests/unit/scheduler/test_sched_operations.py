"""Operations: long-poll waits, cancel, tenant isolation, status snapshot, shutdown."""

import asyncio
import itertools
import time

import pytest
from scheduler_fakes import FakePlacement, FakeTrainer, Mesh, make_mesh, settle

from tunemesh.errors import Code, FailedPreconditionError, NotFoundError
from tunemesh_scheduler.core import OpKind, OpState, SchedulerConfig, SchedulerCore


def test_wait_wakes_when_the_operation_finishes():
    async def main():
        mesh = await make_mesh()
        mesh.trainer.hold = asyncio.Event()
        run = await mesh.new_run()
        op = await mesh.submit(run, 1)
        waiter = asyncio.create_task(mesh.core.wait_operation("t1", op.name, 30.0))
        await settle()
        assert op.state is OpState.RUNNING and not waiter.done()
        start = time.monotonic()
        mesh.trainer.hold.set()
        assert (await waiter) is op
        assert op.state is OpState.SUCCEEDED
        assert time.monotonic() - start < 1.0  # woken, not timed out

    asyncio.run(main())


def test_wait_returns_the_unfinished_operation_after_its_timeout():
    async def main():
        mesh = await make_mesh()
        mesh.trainer.hold = asyncio.Event()
        run = await mesh.new_run()
        op = await mesh.submit(run, 1)
        start = time.monotonic()
        assert (await mesh.core.wait_operation("t1", op.name, 0.05)) is op
        assert 0.04 <= time.monotonic() - start < 1.0
        assert not op.done
        assert (await mesh.core.wait_operation("t1", op.name, 0)) is op
        mesh.trainer.hold.set()
        await mesh.wait_all([op])

    asyncio.run(main())


def test_cancel_a_waiting_op_lets_later_seq_ids_proceed():
    async def main():
        mesh = await make_mesh()
        mesh.trainer.hold = asyncio.Event()
        run = await mesh.new_run()
        ops = [await mesh.submit(run, seq) for seq in (1, 2, 3)]
        await settle()
        waiter = asyncio.create_task(mesh.core.wait_operation("t1", ops[1].name, 30.0))
        await settle()
        assert mesh.core.cancel_operation("t1", ops[1].name) is ops[1]
        assert (await waiter).state is OpState.CANCELLED
        assert ops[1].error.code == Code.CANCELLED
        # The running op cannot be cancelled: best effort, returned unchanged.
        assert mesh.core.cancel_operation("t1", ops[0].name).state is OpState.RUNNING
        mesh.trainer.hold.set()
        await mesh.wait_all(ops)
        assert [payload[1] for _, _, payload in mesh.trainer.executed] == [1, 3]
        assert [op.state for op in ops] == [OpState.SUCCEEDED, OpState.CANCELLED, OpState.SUCCEEDED]
        assert mesh.core.cancel_operation("t1", ops[2].name).state is OpState.SUCCEEDED
        assert mesh.core.get_run("t1", run).last_seq_id == 3

    asyncio.run(main())


def test_cancel_a_ready_op_waiting_for_the_next_batch():
    async def main():
        mesh = await make_mesh()
        mesh.trainer.hold = asyncio.Event()
        busy, other = await mesh.new_run(), await mesh.new_run()
        first = await mesh.submit(busy, 1)
        await settle()
        ready = await mesh.submit(other, 1)
        nxt = await mesh.submit(other, 2, kind=OpKind.OPTIM_STEP)
        await settle()
        assert ready.state is OpState.QUEUED  # released, waiting behind the running batch
        mesh.core.cancel_operation("t1", ready.name)
        mesh.trainer.hold.set()
        await mesh.wait_all([first, ready, nxt])
        assert ready.state is OpState.CANCELLED and nxt.state is OpState.SUCCEEDED
        assert sorted((run, kind) for run, kind, _ in mesh.trainer.executed) == sorted(
            [(busy, OpKind.FORWARD_BACKWARD), (other, OpKind.OPTIM_STEP)])
        sent = {item.op_name for _, items in mesh.trainer.batches for item in items}
        assert ready.name not in sent

    asyncio.run(main())


def test_cancelling_every_op_behind_a_gap_disarms_the_gap_timer():
    async def main():
        mesh = await make_mesh(gap_timeout_s=30)
        run = await mesh.new_run()
        later = await mesh.submit(run, 2)
        mesh.core.cancel_operation("t1", later.name)
        await mesh.advance(60)
        assert later.state is OpState.CANCELLED  # not overwritten by SEQ_ID_GAP
        assert mesh.core.machine.lanes[run].gap_deadline is None

    asyncio.run(main())


def test_other_tenants_cannot_see_or_touch_operations():
    async def main():
        mesh = await make_mesh()
        run = await mesh.new_run("t1")
        op = await mesh.submit(run, 1, "t1")
        for call in (
            lambda: mesh.core.get_operation("t2", op.name),
            lambda: mesh.core.cancel_operation("t2", op.name),
        ):
            with pytest.raises(NotFoundError) as info:
                call()
            assert info.value.reason == "OPERATION_NOT_FOUND"
        with pytest.raises(NotFoundError):
            await mesh.core.wait_operation("t2", op.name, 0.01)
        with pytest.raises(NotFoundError) as info:
            await mesh.submit(run, 2, "t2")
        assert info.value.reason == "RUN_NOT_FOUND"
        with pytest.raises(NotFoundError):
            mesh.core.get_operation("t1", "operations/missing")
        assert mesh.core.get_operation("t1", op.name) is op

    asyncio.run(main())


def test_snapshot_counts_queues_per_tenant_and_node():
    async def main():
        mesh = await make_mesh(gap_timeout_s=60)
        a, b = await mesh.new_run("t1", "node-a"), await mesh.new_run("t2", "node-b")
        await mesh.submit(a, 2, "t1")
        await mesh.submit(a, 3, "t1")
        await mesh.submit(b, 2, "t2")
        snap = mesh.core.snapshot()
        assert snap["runs"] == 2 and snap["sessions_open"] == 2
        assert snap["operations_by_state"] == {"QUEUED": 3}
        assert snap["queued_by_tenant"] == {"t1": 2, "t2": 1}
        assert snap["queued_by_node"] == {"node-a": 2, "node-b": 1}
        done = [await mesh.submit(a, 1, "t1")]
        await mesh.wait_all(done + [mesh.core.get_operation("t1", "operations/id5")])
        await settle()
        snap = mesh.core.snapshot()
        assert snap["operations_by_state"] == {"SUCCEEDED": 3, "QUEUED": 1}
        assert snap["queued_by_tenant"] == {"t1": 0, "t2": 1}  # t1 stays listed, at 0
        assert snap["nodes"]["node-a"]["batches_total"] == 3
        assert snap["nodes"]["node-a"]["ready"] == 0

    asyncio.run(main())


def test_stop_fails_unfinished_ops_and_wakes_waiters():
    async def main():
        mesh = await make_mesh()
        mesh.trainer.hold = asyncio.Event()
        run = await mesh.new_run()
        ops = [await mesh.submit(run, 1), await mesh.submit(run, 2)]
        await settle()
        waiter = asyncio.create_task(mesh.core.wait_operation("t1", ops[1].name, 30.0))
        await settle()
        await mesh.core.stop()
        assert (await waiter).state is OpState.FAILED
        for op in ops:
            assert (op.error.code, op.error.reason) == (Code.UNAVAILABLE, "SCHEDULER_STOPPING")

    asyncio.run(main())


def test_finished_operations_are_forgotten_after_their_ttl_and_retries_cannot_rerun_them():
    async def main():
        now = [1000.0]
        counter = itertools.count(1)
        trainer = FakeTrainer()
        placement = FakePlacement()
        core = SchedulerCore(placement, trainer, SchedulerConfig(finished_ttl_s=60),
                             clock=lambda: now[0], new_id=lambda: f"id{next(counter)}")
        await core.start()
        mesh = Mesh(core, placement, trainer)
        run = await mesh.new_run()
        done = await mesh.submit(run, 1, request_id="r1")
        await mesh.wait_all([done])
        now[0] += 30
        queued_later = await mesh.submit(run, 2, request_id="r2")
        await mesh.wait_all([queued_later])
        now[0] += 45  # op 1 ended 75 s ago, op 2 ended 45 s ago
        assert core.evict_finished() == 1
        with pytest.raises(NotFoundError):
            core.get_operation("t1", done.name)
        assert core.get_operation("t1", queued_later.name) is queued_later
        with pytest.raises(FailedPreconditionError) as info:  # the same call again: never re-executed
            await mesh.submit(run, 1, request_id="r1")
        assert info.value.reason == "SEQ_ID_PASSED"
        assert len(trainer.executed) == 2
        await core.stop()

    asyncio.run(main())
