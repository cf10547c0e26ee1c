"""Fault: a trainer dies (SIGKILL) while two tenants pipeline training on two trainers.
Its runs move to the live trainer as soon as the scheduler finds its port refusing
connections (which ends its lease; a pause or a partition waits for the lease to lapse,
see test_pause_and_etcd.py): restored from their latest
automatic snapshot and replayed from the op log after it. Clients see only latency:
every future completes, no operation is reported failed, and each tenant's per-step
losses, final logprobs and saved adapter and optimizer files are bit-identical to an
untouched twin; each adapter took exactly the optimizer steps that were acknowledged."""

from __future__ import annotations

import os
import random
import time

import pytest
from pathlib import Path

from fault_ops import kill, leader, process, restart
from tunemesh_local import processes
from twin_runs import assert_matches_twin, train_pair

from tunemesh_local.state import MeshState

pytestmark = pytest.mark.e2e



def test_trainer_sigkill_mid_pipeline_is_only_latency(fault_mesh: MeshState, twin: list[dict]) -> None:
    after = random.Random(int.from_bytes(os.urandom(4), "little")).randrange(2, 12)  # a random step
    unfinished, victims = [], []

    def fault(trainees) -> None:
        trainees[0].futures[2 * after].result(timeout=120)
        victim = trainees[0].training.get_info().trainer_node
        unfinished.append(sum(not f.done() for t in trainees for f in t.futures))
        kill(fault_mesh, victim)
        victims.append(victim)

    try:
        faulted = train_pair(fault_mesh.scheduler_address, during=fault)
    finally:
        for victim in victims:  # the mesh serves the next tests with both trainers
            restart(fault_mesh, victim)
    assert unfinished[0] > 0, "the kill came after the pipelines drained: it tested nothing"
    assert_matches_twin(faulted, twin, f"(kill after step {after})")
    assert process(fault_mesh, victims[0]).pid  # restarted
    log = (Path(fault_mesh.state_dir) / "logs" / f"{leader(fault_mesh)}.log").read_text(errors="replace")
    assert f"trainer {victims[0]} refuses connections" in log, "the dead trainer waited for its lease to lapse"


def test_a_restarted_trainer_takes_runs_back_rebuilt_exactly(fault_mesh: MeshState, twin: list[dict]) -> None:
    """The killed trainer comes back: the survivor holds both runs, two more than it, so
    one moves back (rebuilt from its snapshot and log like a failover move, its stale copy
    on the survivor freed), and both runs still equal the twin."""
    after = random.Random(int.from_bytes(os.urandom(4), "little")).randrange(2, 12)
    victims, nodes = [], {}

    def placed(trainees) -> set[str]:
        return {t.training.get_info().trainer_node for t in trainees}

    def fault(trainees) -> None:
        trainees[0].futures[2 * after].result(timeout=120)
        victims.append(trainees[0].training.get_info().trainer_node)
        kill(fault_mesh, victims[0])
        for t in trainees:
            t.futures[-1].result(timeout=120)
        nodes["crowded"] = placed(trainees)
        restart(fault_mesh, victims[0])
        deadline = time.monotonic() + 60
        while len(placed(trainees)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        nodes["balanced"] = placed(trainees)

    try:
        faulted = train_pair(fault_mesh.scheduler_address, during=fault)
    finally:
        if victims and not processes.is_alive(process(fault_mesh, victims[0]).pid,
                                               process(fault_mesh, victims[0]).start_time):
            restart(fault_mesh, victims[0])
    assert len(nodes["crowded"]) == 1 and victims[0] not in nodes["crowded"], nodes
    assert nodes["balanced"] == nodes["crowded"] | {victims[0]}, nodes
    assert_matches_twin(faulted, twin, f"(kill after step {after}, then a move back)")
    log = (Path(fault_mesh.state_dir) / "logs" / f"{leader(fault_mesh)}.log").read_text(errors="replace")
    assert f"to {victims[0]}, which holds 0 runs" in log
    survivor = next(iter(nodes["crowded"]))
    assert "freed runs/" in log and f"on {survivor}: the run moved away" in log  # its stale copy
