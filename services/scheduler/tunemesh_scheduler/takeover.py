"""Starting from what a previous scheduler left: load the durable state, fence its runs
on their trainers with the new epochs, free adapters no run owns."""

from __future__ import annotations

import asyncio
import logging

from tunemesh.errors import TunemeshError
from tunemesh_scheduler.core import recovery
from tunemesh_scheduler.core.ports import RunStore, TrainerPort

log = logging.getLogger(__name__)


async def load_plan(store: RunStore, retry_s: float = 1.0) -> recovery.RecoveryPlan:
    """The recovery plan of the stored state; waits (logging) while the store is down."""
    while True:
        try:
            plan = recovery.plan(await store.load())
        except TunemeshError as exc:
            log.warning("waiting for the state store: %s", exc)
            await asyncio.sleep(retry_s)
            continue
        queued = sum(len(r.queued) for r in plan.runs)
        lost = sum(len(r.lost) for r in plan.runs)
        log.info("recovered %d sessions, %d runs, %d queued operations (%d to be re-sent by clients)",
                 len(plan.sessions), len(plan.runs), queued, lost)
        return plan


async def fence_runs(plan: recovery.RecoveryPlan, trainers: TrainerPort) -> list[str]:
    """Raise each run's epoch on its trainer: calls of the previous scheduler are refused
    from now on. Returns the runs to rebuild from their snapshot and log: those whose
    trainer no longer holds their adapter (it restarted), and those whose adapter took
    seq_ids the store never heard of (acknowledged through a store outage by a scheduler
    that lost the leadership before storing them: their clients never saw those results
    and re-send them, see core/release.py). A trainer that cannot be reached is left as
    it is (its runs move if it does not come back before its lease lapses)."""
    lost = []

    async def fence(recovered: recovery.RecoveredRun) -> None:
        run = recovered.run
        try:
            applied = await trainers.adopt_adapter(run.node_id, run.name, run.epoch)
        except TunemeshError as exc:
            log.warning("could not fence %s on %s: %s", run.name, run.node_id, exc, extra={"run": run.name})
            if exc.reason == "ADAPTER_NOT_FOUND":
                lost.append(run.name)
            return
        stored = {op.seq_id for op in recovered.finished + recovered.queued + recovered.lost}
        unknown = [seq for seq in range(run.last_seq_id + 1, applied + 1) if seq not in stored]
        if unknown:  # above the store's last, or a gap below it (seq_ids may arrive out of order)
            log.warning("%s on %s took seq_ids the store does not know (%d of them, the first %d): rebuilding it",
                        run.name, run.node_id, len(unknown), unknown[0], extra={"run": run.name})
            lost.append(run.name)

    await asyncio.gather(*(fence(r) for r in plan.runs if r.run.node_id))  # frozen runs hold no adapter
    return lost


async def free_orphans(plan: recovery.RecoveryPlan, trainers: TrainerPort, nodes: list[str]) -> int:
    """Delete adapters of runs the store does not know (their create never completed,
    or their delete did not reach the trainer); returns how many."""
    known = {r.run.name for r in plan.runs}
    freed = 0
    for node in nodes:
        try:
            held = await trainers.list_adapters(node)
        except TunemeshError as exc:
            log.warning("could not list the adapters of %s: %s", node, exc)
            continue
        for adapter in held:
            if adapter.startswith("runs/") and adapter not in known:
                try:
                    await trainers.delete_adapter(node, adapter)
                    freed += 1
                except TunemeshError as exc:
                    log.warning("could not free orphan adapter %s on %s: %s", adapter, node, exc)
    if freed:
        log.info("freed %d adapters that no run owns", freed)
    return freed
