"""Fault: the leading scheduler replica dies (SIGKILL) while two tenants pipeline
training; the standby takes over (etcd election) and recovers the state from etcd, and
the killed replica comes back as the new standby. Clients, given both addresses, see
only latency: every future completes, no operation is reported failed, and each tenant's
per-step losses, final logprobs and saved adapter and optimizer files are bit-identical
to an untouched twin run; each adapter took exactly the optimizer steps acknowledged.

Real processes on loopback: etcd, a checkpoint service, two tiny-dense trainers, two
scheduler replicas; faults sent by the test itself; every wait bounded."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from fault_ops import MODEL, kill, leader, restart
from twin_runs import ADAM, RESULT_TIMEOUT_S, TENANTS, assert_matches_twin, step_data, train_pair

import tunemesh
from tunemesh_local import state
from tunemesh_local.state import MeshState

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def mesh(fault_mesh: MeshState) -> MeshState:
    return fault_mesh


def kill_leader(mesh: MeshState) -> None:
    """SIGKILL the leading scheduler; start it again (it stands by under the new leader)."""
    name = leader(mesh)
    kill(mesh, name)
    restart(mesh, name)


def _takeovers(mesh: MeshState) -> dict[str, int]:
    """Per scheduler replica: how often its log says it ended a dead leader's lease."""
    logs = Path(mesh.state_dir) / "logs"
    return {r.name: (logs / f"{r.name}.log").read_text(errors="replace").count("is gone (its lease has")
            for r in state.load(Path(mesh.state_dir)).by_role("scheduler")}


def test_scheduler_sigkill_mid_pipeline_is_only_latency(mesh: MeshState, twin: list[dict]) -> None:
    after = random.Random(int.from_bytes(os.urandom(4), "little")).randrange(1, 8)  # a random step
    unfinished, before = [], _takeovers(mesh)

    def fault(trainees) -> None:
        trainees[0].futures[2 * after].result(timeout=RESULT_TIMEOUT_S)
        unfinished.append(sum(not f.done() for t in trainees for f in t.futures))
        kill_leader(mesh)

    faulted = train_pair(mesh.scheduler_address, during=fault)
    assert unfinished[0] > 0, "the kill came after the pipelines drained: it tested nothing"
    assert_matches_twin(faulted, twin, f"(kill after step {after})")
    # A standby (on loopback with the leader) found the dead leader's port refusing and
    # ended its lease, rather than waiting for it to lapse (either replica may have: the
    # killed one is back as a standby at once).
    assert sum(_takeovers(mesh).values()) > sum(before.values())


def test_run_survives_scheduler_restart_between_calls(mesh: MeshState) -> None:
    """A run created before a SIGKILL answers after it, by name, with its step; a
    finished operation is still there; the client goes on where it was."""
    with tunemesh.ServiceClient(mesh.scheduler_address, api_key=TENANTS[0]) as client:
        training = client.create_lora_training_client(MODEL, rank=4, seed=3)
        training.forward_backward(step_data(0, 0)).result(timeout=RESULT_TIMEOUT_S)
        training.optim_step(ADAM).result(timeout=RESULT_TIMEOUT_S)
        kill_leader(mesh)
        assert training.get_info().step == 1
        result = training.forward_backward(step_data(0, 1)).result(timeout=RESULT_TIMEOUT_S)
        assert result.metrics["loss:sum"] > 0
        assert training.optim_step(ADAM).result(timeout=RESULT_TIMEOUT_S) is not None
        assert training.get_info().step == 2
