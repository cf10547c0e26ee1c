"""Scheduler metrics recorded by the core: queue wait per tenant, fused batch sizes,
tokens per tenant, finished operations, and the gauges read from its snapshot."""

from __future__ import annotations

import asyncio
import itertools

from prometheus_client import CollectorRegistry
from scheduler_fakes import FakePlacement, FakeTrainer, Mesh, settle

from tunemesh_scheduler.metrics import SchedulerMetrics
from tunemesh_scheduler.core import OpKind, SchedulerConfig, SchedulerCore


async def _mesh(now: list[float], registry: CollectorRegistry) -> Mesh:
    counter = itertools.count(1)
    metrics = SchedulerMetrics(registry)
    placement, trainer = FakePlacement(), FakeTrainer()
    core = SchedulerCore(placement, trainer, SchedulerConfig(), clock=lambda: now[0],
                         new_id=lambda: f"id{next(counter)}", metrics=metrics)
    metrics.follow(core.snapshot, lambda: {"trainer": 1, "sampler": 0})
    await core.start()
    return Mesh(core, placement, trainer)


def test_queue_wait_is_the_time_from_submission_until_a_trainer_gets_the_op():
    registry, now = CollectorRegistry(), [1000.0]

    async def main():
        mesh = await _mesh(now, registry)
        first, second = await mesh.new_run("t1"), await mesh.new_run("t2")
        mesh.trainer.hold = asyncio.Event()  # the first batch blocks the node
        a = await mesh.submit(first, 1, "t1", tokens=30)
        await settle()
        b = await mesh.submit(second, 1, "t2", tokens=12)
        await settle()
        assert registry.get_sample_value("tunemesh_scheduler_queue_depth", {"tenant": "t2"}) == 1
        now[0] = 1003.0
        mesh.trainer.hold.set()
        await mesh.wait_all([a, b])
        await mesh.core.stop()

    asyncio.run(main())
    wait = {t: (registry.get_sample_value("tunemesh_scheduler_queue_wait_seconds_sum", {"tenant": t}),
                registry.get_sample_value("tunemesh_scheduler_queue_wait_seconds_count", {"tenant": t}))
            for t in ("t1", "t2")}
    assert wait == {"t1": (0.0, 1.0), "t2": (3.0, 1.0)}
    assert registry.get_sample_value("tunemesh_scheduler_queue_depth", {"tenant": "t2"}) == 0  # kept, at 0


def test_batches_tokens_and_finished_operations_are_counted():
    registry, now = CollectorRegistry(), [1000.0]

    async def main():
        mesh = await _mesh(now, registry)
        runs = [await mesh.new_run("t1"), await mesh.new_run("t1"), await mesh.new_run("t2")]
        ops = [await mesh.submit(run, 1, tenant, tokens=tokens)
               for run, tenant, tokens in zip(runs, ["t1", "t1", "t2"], [10, 20, 5])]
        ops.append(await mesh.submit(runs[0], 2, "t1", kind=OpKind.OPTIM_STEP, tokens=0))
        await mesh.wait_all(ops)
        snapshot_runs = registry.get_sample_value("tunemesh_scheduler_runs")
        await mesh.core.stop()
        return snapshot_runs

    assert asyncio.run(main()) == 3
    get = registry.get_sample_value
    assert get("tunemesh_scheduler_tokens_total", {"tenant": "t1", "kind": "forward_backward"}) == 30
    assert get("tunemesh_scheduler_tokens_total", {"tenant": "t2", "kind": "forward_backward"}) == 5
    batches = get("tunemesh_scheduler_batch_items_count", {"trainer": "node-a"})
    assert batches >= 1
    assert get("tunemesh_scheduler_batch_items_sum", {"trainer": "node-a"}) == 4  # 3 forward ops + 1 optim step
    assert get("tunemesh_scheduler_batch_tokens_sum", {"trainer": "node-a"}) == 35
    assert get("tunemesh_scheduler_operations_finished_total",
               {"tenant": "t1", "kind": "optim_step", "state": "SUCCEEDED"}) == 1
    assert get("tunemesh_scheduler_operations_finished_total",
               {"tenant": "t1", "kind": "forward_backward", "state": "SUCCEEDED"}) == 2
    assert get("tunemesh_scheduler_operations", {"state": "SUCCEEDED"}) == 4
    assert get("tunemesh_scheduler_nodes", {"role": "trainer"}) == 1
    assert get("tunemesh_scheduler_ready_depth", {"trainer": "node-a"}) == 0


def test_a_failed_batch_counts_its_operations_as_failed():
    from tunemesh.errors import UnavailableError

    registry, now = CollectorRegistry(), [1000.0]

    async def main():
        mesh = await _mesh(now, registry)
        run = await mesh.new_run("t1")
        mesh.trainer.batch_error["node-a"] = UnavailableError("TRAINER_GONE", "down")
        op = await mesh.submit(run, 1, "t1")
        await mesh.wait_all([op])
        await mesh.core.stop()

    asyncio.run(main())
    assert registry.get_sample_value("tunemesh_scheduler_operations_finished_total",
                                     {"tenant": "t1", "kind": "forward_backward", "state": "FAILED"}) == 1
