"""Per-run seq_id ordering, gaps, pipelining and idempotent submits."""

import asyncio

import pytest
from scheduler_fakes import make_mesh, settle

from tunemesh.errors import (
    AlreadyExistsError,
    Code,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from tunemesh_scheduler.core import ItemOutcome, OperationError, OpKind, OpState, RunRecord


def test_out_of_order_arrival_executes_in_seq_order():
    async def main():
        mesh = await make_mesh()
        run = await mesh.new_run()
        ops = [await mesh.submit(run, seq) for seq in (3, 5, 2, 4)]
        await settle()
        assert mesh.trainer.executed == []  # seq 1 missing: nothing may run
        assert all(op.state is OpState.QUEUED for op in ops)
        ops.append(await mesh.submit(run, 1))
        await mesh.wait_all(ops)
        assert [payload[1] for _, _, payload in mesh.trainer.executed] == [1, 2, 3, 4, 5]
        assert all(op.state is OpState.SUCCEEDED for op in ops)
        assert ops[0].result == ("ok", (run, 3))
        assert mesh.core.get_run("t1", run).last_seq_id == 5

    asyncio.run(main())


def test_pipelined_forward_backward_and_optim_step_complete_in_order():
    async def main():
        mesh = await make_mesh()
        run = await mesh.new_run()
        ops = [
            await mesh.submit(run, 1),
            await mesh.submit(run, 2, kind=OpKind.OPTIM_STEP, tokens=0),
            await mesh.submit(run, 3),
            await mesh.submit(run, 4, kind=OpKind.FORWARD),
        ]
        await mesh.wait_all(ops)
        kinds = [(kind, payload[1]) for _, kind, payload in mesh.trainer.executed]
        assert kinds == [(OpKind.FORWARD_BACKWARD, 1), (OpKind.OPTIM_STEP, 2),
                         (OpKind.FORWARD_BACKWARD, 3), (OpKind.FORWARD, 4)]
        assert ops[1].result == ("ok", (run, 2))
        record = mesh.core.get_run("t1", run)
        assert (record.step, record.last_seq_id) == (1, 4)
        assert all(op.end_time is not None and op.payload is None for op in ops)

    asyncio.run(main())


def test_gap_timeout_fails_waiting_ops_and_run_recovers():
    async def main():
        mesh = await make_mesh(gap_timeout_s=30)
        run = await mesh.new_run()
        waiting = [await mesh.submit(run, 2), await mesh.submit(run, 3)]
        await mesh.advance(29.9)
        assert not any(op.done for op in waiting)
        await mesh.advance(0.1)
        await mesh.wait_all(waiting, timeout_s=0)
        for op in waiting:
            assert op.state is OpState.FAILED
            assert (op.error.code, op.error.reason) == (Code.FAILED_PRECONDITION, "SEQ_ID_GAP")
        assert mesh.trainer.executed == []
        # The late seq 1 still runs; 2 and 3 count as done, so 4 follows it.
        late = [await mesh.submit(run, 1), await mesh.submit(run, 4)]
        await mesh.wait_all(late)
        assert [payload[1] for _, _, payload in mesh.trainer.executed] == [1, 4]
        assert mesh.core.get_run("t1", run).last_seq_id == 4

    asyncio.run(main())


def test_gap_timer_is_disarmed_when_the_gap_fills():
    async def main():
        mesh = await make_mesh(gap_timeout_s=30)
        run = await mesh.new_run()
        later = await mesh.submit(run, 2)
        await mesh.advance(10)
        first = await mesh.submit(run, 1)
        await mesh.wait_all([first, later])
        await mesh.advance(60)  # past the original deadline
        assert later.state is OpState.SUCCEEDED

    asyncio.run(main())


def test_retries_return_the_same_operation():
    async def main():
        mesh = await make_mesh()
        run = await mesh.new_run()
        op = await mesh.submit(run, 1, request_id="r1")
        assert await mesh.submit(run, 1, request_id="r1") is op
        assert await mesh.submit(run, 1, request_id="") is op  # keyed on (run, seq_id) too
        assert await mesh.submit(run, 1, request_id="r1-retry") is op
        await mesh.wait_all([op])
        assert await mesh.submit(run, 1, request_id="r1") is op  # after completion too
        assert len(mesh.trainer.executed) == 1
        assert len(mesh.core.operations) == 1

    asyncio.run(main())


def test_reused_ids_with_different_payload_are_rejected():
    async def main():
        mesh = await make_mesh()
        run = await mesh.new_run()
        await mesh.submit(run, 1, request_id="r1")
        with pytest.raises(AlreadyExistsError) as info:
            await mesh.submit(run, 2, request_id="r1")
        assert info.value.reason == "REQUEST_ID_REUSED"
        with pytest.raises(AlreadyExistsError) as info:
            await mesh.submit(run, 1, request_id="r1", payload="different")
        assert info.value.reason == "REQUEST_ID_REUSED"
        with pytest.raises(AlreadyExistsError) as info:
            await mesh.submit(run, 1, request_id="r2", payload="different")
        assert info.value.reason == "SEQ_ID_REUSED"
        with pytest.raises(AlreadyExistsError) as info:
            await mesh.submit(run, 1, kind=OpKind.FORWARD)
        assert info.value.reason == "SEQ_ID_REUSED"
        with pytest.raises(InvalidArgumentError) as info:
            await mesh.submit(run, 0)
        assert info.value.reason == "INVALID_SEQ_ID"
        with pytest.raises(InvalidArgumentError) as info:
            await mesh.submit(run, 2, kind="SAVE_EVERYTHING")
        assert info.value.reason == "UNSUPPORTED_KIND"
        assert len(mesh.core.operations) == 1

    asyncio.run(main())


def test_seq_id_below_a_restored_run_frontier_is_rejected():
    async def main():
        mesh = await make_mesh()
        session = mesh.core.create_session("t1")
        mesh.core.restore_run(RunRecord(
            name="runs/old", tenant="t1", session=session.name, base_model="tiny",
            lora={}, node_id="node-a", create_time=1.0, step=2, last_seq_id=5,
        ))
        with pytest.raises(FailedPreconditionError) as info:
            await mesh.submit("runs/old", 5)
        assert info.value.reason == "SEQ_ID_PASSED"
        op = await mesh.submit("runs/old", 6)
        await mesh.wait_all([op])
        assert op.state is OpState.SUCCEEDED

    asyncio.run(main())


def test_failed_op_does_not_block_the_rest_of_its_run():
    async def main():
        mesh = await make_mesh()
        run = await mesh.new_run()
        bad = OperationError(Code.INVALID_ARGUMENT, "NON_FINITE_LOSS", "nan")
        mesh.trainer.item_errors[(run, 1)] = ItemOutcome(error=bad)
        ops = [await mesh.submit(run, 1), await mesh.submit(run, 2)]
        await mesh.wait_all(ops)
        assert ops[0].state is OpState.FAILED and ops[0].error == bad
        assert ops[1].state is OpState.SUCCEEDED

    asyncio.run(main())


def test_a_run_cannot_queue_unboundedly_far_ahead():
    async def main():
        mesh = await make_mesh(max_ops_ahead=3)
        run = await mesh.new_run()
        with pytest.raises(ResourceExhaustedError) as info:
            await mesh.submit(run, 4)  # last finished is 0: seq 1..3 fit, 4 does not
        assert info.value.reason == "TOO_MANY_QUEUED"
        ops = [await mesh.submit(run, seq) for seq in (1, 2, 3)]
        await mesh.wait_all(ops)
        await mesh.wait_all([await mesh.submit(run, 4)])  # room again once earlier ops are done

    asyncio.run(main())


def test_a_tenant_over_its_queue_caps_gets_tenant_queue_full_and_others_are_unaffected():
    async def main():
        mesh = await make_mesh(max_queued_ops_per_tenant=3, max_queued_tokens_per_tenant=250)
        mesh.trainer.hold = asyncio.Event()
        flood = [await mesh.new_run("A") for _ in range(4)]
        other = await mesh.new_run("B")
        first = await mesh.submit(flood[0], 1, "A", tokens=100)  # goes out: the trainer holds it
        await settle()
        queued = [await mesh.submit(run, 1, "A", tokens=100) for run in flood[1:3]]  # 200 tokens queued
        with pytest.raises(ResourceExhaustedError) as full:
            await mesh.submit(flood[3], 1, "A", tokens=100)  # 300 > 250 tokens
        assert full.value.reason == "TENANT_QUEUE_FULL"
        small = await mesh.submit(flood[3], 1, "A", tokens=10)  # 210 tokens, 3 ops: fits
        with pytest.raises(ResourceExhaustedError):
            await mesh.submit(flood[0], 2, "A", tokens=1)  # a fourth queued op
        b_op = await mesh.submit(other, 1, "B", tokens=100)  # B's own caps are untouched
        mesh.trainer.hold.set()
        await mesh.wait_all([first, *queued, small, b_op])
        again = await mesh.submit(flood[0], 2, "A", tokens=1)  # the queue drained: room again
        await mesh.wait_all([again])

    asyncio.run(main())
