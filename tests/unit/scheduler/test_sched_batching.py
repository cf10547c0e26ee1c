"""Fused batches per node: merging, token budget, tenant fairness, failures."""

import asyncio

from scheduler_fakes import make_mesh, settle

from tunemesh.errors import Code, UnavailableError
from tunemesh_scheduler.core import OpKind, OpState
from tunemesh_scheduler.core.fairness import FairQueue
from tunemesh_scheduler.core.records import OperationRecord


def _batch_runs(trainer):
    return [(node, sorted(item.run_name for item in items)) for node, items in trainer.batches]


def test_ready_ops_of_different_tenants_on_one_node_share_a_batch():
    async def main():
        mesh = await make_mesh()
        runs = [await mesh.new_run("t1"), await mesh.new_run("t2"), await mesh.new_run("t3")]
        ops = [await mesh.submit(run, 1, tenant) for run, tenant in zip(runs, ["t1", "t2", "t3"])]
        await mesh.wait_all(ops)
        assert _batch_runs(mesh.trainer) == [("node-a", sorted(runs))]
        item = mesh.trainer.batches[0][1][0]
        assert item.op_name in {op.name for op in ops} and item.kind is OpKind.FORWARD_BACKWARD

    asyncio.run(main())


def test_batches_never_span_nodes():
    async def main():
        mesh = await make_mesh()
        a1, a2 = await mesh.new_run(node="node-a"), await mesh.new_run(node="node-a")
        b1 = await mesh.new_run(node="node-b")
        ops = [await mesh.submit(run, 1) for run in (a1, b1, a2)]
        await mesh.wait_all(ops)
        assert sorted(_batch_runs(mesh.trainer)) == [("node-a", sorted([a1, a2])), ("node-b", [b1])]

    asyncio.run(main())


def test_same_run_never_has_two_ops_in_one_batch():
    async def main():
        mesh = await make_mesh()
        run = await mesh.new_run()
        ops = [await mesh.submit(run, seq) for seq in (1, 2, 3)]
        await mesh.wait_all(ops)
        assert [len(items) for _, items in mesh.trainer.batches] == [1, 1, 1]

    asyncio.run(main())


def test_token_budget_splits_batches_but_an_oversized_op_still_runs():
    async def main():
        mesh = await make_mesh(batch_token_budget=1000)
        runs = [await mesh.new_run() for _ in range(5)]
        ops = [await mesh.submit(run, 1, tokens=400) for run in runs]
        big_run = await mesh.new_run()
        ops.append(await mesh.submit(big_run, 1, tokens=5000))
        await mesh.wait_all(ops)
        for _, items in mesh.trainer.batches:
            tokens = sum(item.num_tokens for item in items)
            assert tokens <= 1000 or len(items) == 1
        assert sorted(len(items) for _, items in mesh.trainer.batches) == [1, 1, 2, 2]
        assert all(op.state is OpState.SUCCEEDED for op in ops)

    asyncio.run(main())


def test_a_flooding_tenant_cannot_crowd_out_another_tenants_op():
    async def main():
        mesh = await make_mesh(batch_token_budget=300)
        flood = [await mesh.new_run("big") for _ in range(10)]
        small = await mesh.new_run("small")
        ops = [await mesh.submit(run, 1, "big", tokens=100) for run in flood]
        ops.append(await mesh.submit(small, 1, "small", tokens=100))
        await mesh.wait_all(ops)
        first = [item.run_name for item in mesh.trainer.batches[0][1]]
        # one quantum each: the flood's other nine runs wait for later batches
        assert small in first and len(first) == 2

    asyncio.run(main())


def test_fair_queue_rotates_first_pick_and_keeps_skipped_runs_first():
    def op(tenant, run, tokens=1):
        return OperationRecord(name=f"operations/{run}", tenant=tenant, run=run, seq_id=1,
                               kind=OpKind.FORWARD, request_id="", payload_digest="",
                               num_tokens=tokens, node_id="n", create_time=0.0)

    queue = FairQueue()
    for tenant in "ABC":
        for i in range(3):
            queue.push(op(tenant, f"{tenant}{i}"))
    firsts = [queue.take(1)[0].run for _ in range(6)]
    assert firsts == ["A0", "B0", "C0", "A1", "B1", "C1"]
    # Round-robin within one take: one run of every tenant per round.
    queue = FairQueue()
    for tenant in "AB":
        for i in range(3):
            queue.push(op(tenant, f"{tenant}{i}"))
    assert [o.run for o in queue.take(4)] == ["A0", "B0", "A1", "B1"]
    # A large op that does not fit is skipped but keeps its place at its tenant's front.
    queue = FairQueue()
    queue.push(op("A", "small-a", 1))
    queue.push(op("B", "big-b", 10))
    queue.push(op("B", "small-b", 1))
    assert [o.run for o in queue.take(5)] == ["small-a", "small-b"]
    queue.push(op("A", "next-a", 1))
    assert [o.run for o in queue.take(5)] == ["big-b"]
    assert len(queue) == 1 and queue.discard(op("A", "next-a")) is False


def test_merge_window_lets_later_arrivals_join_the_batch():
    async def main():
        mesh = await make_mesh(batch_wait_s=0.05)
        r1, r2 = await mesh.new_run("t1"), await mesh.new_run("t2")
        first = await mesh.submit(r1, 1, "t1")
        await mesh.advance(0.01)  # the core's clock: still inside the window
        assert mesh.trainer.batches == []
        second = await mesh.submit(r2, 1, "t2")
        await mesh.advance(0.04)  # the window closes
        await mesh.wait_all([first, second])
        assert _batch_runs(mesh.trainer) == [("node-a", sorted([r1, r2]))]

    asyncio.run(main())


def test_ops_arriving_during_a_batch_join_the_next_one():
    async def main():
        mesh = await make_mesh()
        mesh.trainer.hold = asyncio.Event()
        runs = [await mesh.new_run() for _ in range(3)]
        ops = [await mesh.submit(runs[0], 1)]
        await settle()
        ops += [await mesh.submit(run, 1) for run in runs[1:]]
        await settle()
        assert len(mesh.trainer.batches) == 1  # one batch in flight per node
        mesh.trainer.hold.set()
        await mesh.wait_all(ops)
        assert [len(items) for _, items in mesh.trainer.batches] == [1, 2]

    asyncio.run(main())


def test_a_failing_node_fails_only_its_batch():
    async def main():
        mesh = await make_mesh()
        down = [await mesh.new_run(node="node-a") for _ in range(2)]
        up = await mesh.new_run(node="node-b")
        mesh.trainer.batch_error["node-a"] = UnavailableError("NODE_DOWN", "trainer gone")
        failed = [await mesh.submit(run, 1) for run in down]
        ok = await mesh.submit(up, 1)
        await mesh.wait_all([*failed, ok])
        for op in failed:
            assert op.state is OpState.FAILED
            assert (op.error.code, op.error.reason, op.error.retryable) == (
                Code.UNAVAILABLE, "NODE_DOWN", True)
        assert ok.state is OpState.SUCCEEDED
        # The dispatcher survives: the node's next ops run once it is back.
        del mesh.trainer.batch_error["node-a"]
        again = await mesh.submit(down[0], 2)
        await mesh.wait_all([again])
        assert again.state is OpState.SUCCEEDED

    asyncio.run(main())


def test_unexpected_trainer_errors_become_internal_errors():
    async def main():
        mesh = await make_mesh()
        run = await mesh.new_run()
        mesh.trainer.batch_error["node-a"] = RuntimeError("bug")
        crashed = await mesh.submit(run, 1)
        await mesh.wait_all([crashed])
        assert (crashed.error.code, crashed.error.reason) == (Code.INTERNAL, "TRAINER_ERROR")
        del mesh.trainer.batch_error["node-a"]
        mesh.trainer.short_answer = True
        short = await mesh.submit(run, 2)
        await mesh.wait_all([short])
        assert (short.error.code, short.error.reason) == (Code.INTERNAL, "BAD_BATCH_RESPONSE")

    asyncio.run(main())


def test_an_optim_step_queued_behind_a_forward_op_rides_in_its_batch():
    async def main():
        mesh = await make_mesh()
        mesh.trainer.hold = asyncio.Event()
        a, b = await mesh.new_run("t1"), await mesh.new_run("t2")
        first = await mesh.submit(b, 1, "t2")  # occupies the node while a's ops queue up
        await settle()
        ops = [await mesh.submit(a, 1), await mesh.submit(a, 2, kind=OpKind.OPTIM_STEP, tokens=0),
               await mesh.submit(a, 3), await mesh.submit(b, 2, "t2", kind=OpKind.OPTIM_STEP, tokens=0)]
        mesh.trainer.hold.set()
        await mesh.wait_all([first, *ops])
        kinds = [[(item.run_name, item.kind) for item in items] for _, items in mesh.trainer.batches]
        FB, OPT = OpKind.FORWARD_BACKWARD, OpKind.OPTIM_STEP
        assert kinds == [[(b, FB)], [(a, FB), (b, OPT), (a, OPT)], [(a, FB)]]
        assert all(op.state is OpState.SUCCEEDED for op in ops)
        run = mesh.core.get_run("t1", a)
        assert (run.step, run.last_seq_id) == (1, 3)

    asyncio.run(main())


def test_a_cancelled_optim_step_does_not_ride_along():
    async def main():
        mesh = await make_mesh()
        mesh.trainer.hold = asyncio.Event()
        a, b = await mesh.new_run("t1"), await mesh.new_run("t2")
        first = await mesh.submit(b, 1, "t2")
        await settle()
        fb = await mesh.submit(a, 1)
        optim = await mesh.submit(a, 2, kind=OpKind.OPTIM_STEP, tokens=0)
        mesh.core.cancel_operation("t1", optim.name)
        mesh.trainer.hold.set()
        await mesh.wait_all([first, fb])
        sent = [item.op_name for _, items in mesh.trainer.batches for item in items]
        assert optim.name not in sent and optim.state is OpState.CANCELLED
        assert mesh.core.get_run("t1", a).last_seq_id == 2

    asyncio.run(main())


def _op(tenant, run, tokens=1):
    return OperationRecord(name=f"operations/{run}", tenant=tenant, run=run, seq_id=1, kind=OpKind.FORWARD,
                           request_id="", payload_digest="", num_tokens=tokens, node_id="n", create_time=0.0)


def test_a_tenant_alone_fills_the_budget_but_its_runs_buy_it_nothing_against_another():
    queue = FairQueue()
    for i in range(8):
        queue.push(_op("A", f"A{i}", 100))
    assert len(queue.take(1000)) == 8  # alone: the whole budget
    for i in range(8):
        queue.push(_op("A", f"A{i}", 100))
    queue.push(_op("B", "B0", 100))
    assert sorted(o.run for o in queue.take(1000)) == ["A0", "B0"]  # one quantum each
    # B was just served and its next operation is on its way: A still gets one quantum only
    assert [o.run for o in queue.take(1000, contending={"B"})] == ["A1"]
    assert len(queue.take(1000, contending={"A"})) == 6  # B gone quiet: A fills the batch


def test_backlogged_tenants_get_equal_tokens_whatever_their_operation_sizes():
    queue = FairQueue()
    served = {"A": 0, "B": 0}
    for step in range(200):
        for tenant, tokens in (("A", 100), ("B", 30)):
            while queue.depth_by_tenant().get(tenant, 0) < 6:  # both always backlogged
                queue.push(_op(tenant, f"{tenant}{step}-{queue.depth_by_tenant().get(tenant, 0)}", tokens))
        for op in queue.take(400):
            served[op.tenant] += op.num_tokens
    share = served["A"] / (served["A"] + served["B"])
    assert 0.45 <= share <= 0.55, served


def test_an_operation_over_its_quantum_waits_for_the_deficit_it_needs():
    queue = FairQueue()
    queue.push(_op("A", "A-big", 300))
    for i in range(3):
        queue.push(_op("B", f"B{i}", 100))
    first = [o.run for o in queue.take(1000)]
    assert first == ["A-big", "B0", "B1", "B2"]  # the quantum is the largest ready operation
    queue.push(_op("A", "A-small", 10))
    queue.push(_op("B", "B3", 100))
    assert sorted(o.run for o in queue.take(1000)) == ["A-small", "B3"]
    assert len(queue) == 0 and queue.take(1000) == []
