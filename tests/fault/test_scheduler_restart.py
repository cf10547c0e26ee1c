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

import numpy as np
import pytest
from fault_ops import MODEL, kill, leader, restart

import tunemesh
from tunemesh_local.state import MeshState

pytestmark = pytest.mark.e2e

VOCAB = 1024
TENANTS = ("tml-demo-alice", "tml-demo-bob")
STEPS = 24
RESULT_TIMEOUT_S = 120
ADAM = tunemesh.AdamParams(learning_rate=1e-2)


@pytest.fixture(scope="module")
def mesh(fault_mesh: MeshState) -> MeshState:
    return fault_mesh


def step_data(tenant: int, step: int) -> list[tunemesh.Datum]:
    rng = np.random.default_rng(1000 * tenant + step)
    data = []
    for index in range(2):
        tokens = rng.integers(1, VOCAB, size=10 + 4 * index + 1)
        data.append(tunemesh.Datum(
            model_input=tunemesh.ModelInput.from_ints(tokens[:-1].tolist()),
            loss_fn_inputs={"target_tokens": tokens[1:].astype(np.int64),
                            "weights": np.ones(len(tokens) - 1, dtype=np.float32)},
        ))
    return data


class Trainee:
    """One tenant's run: STEPS pipelined forward_backward + optim_step, then a probe
    forward and a state save; `fingerprint()` is what must match the twin."""

    def __init__(self, address: str, tenant: int) -> None:
        self.tenant = tenant
        self.client = tunemesh.ServiceClient(address, api_key=TENANTS[tenant])
        self.training = self.client.create_lora_training_client(MODEL, rank=4, seed=7 + tenant)
        self.futures: list = []

    def submit_all(self) -> list:
        for step in range(STEPS):
            self.futures.append(self.training.forward_backward(step_data(self.tenant, step)))
            self.futures.append(self.training.optim_step(ADAM))
        return self.futures

    def fingerprint(self, futures: list) -> dict:
        results = [f.result(timeout=RESULT_TIMEOUT_S) for f in futures]  # raises if any failed
        losses = [r.metrics["loss:sum"] for r in results[0::2]]
        probe = self.training.forward(step_data(self.tenant, 99)).result(timeout=RESULT_TIMEOUT_S)
        logprobs = [np.asarray(o["logprobs"].to_numpy()).tobytes() for o in probe.loss_fn_outputs]
        saved = self.training.save_state("final").result(timeout=RESULT_TIMEOUT_S)
        checkpoint = self.client.create_checkpoint_client().get(saved.path)
        files = {f.name: f.sha256 for f in checkpoint.files if f.name != "adapter_config.json"}
        return {"losses": losses, "logprobs": logprobs, "files": files, "step": self.training.get_info().step,
                "checkpoint_step": checkpoint.step}

    def close(self) -> None:
        self.client.close()


def train_pair(address: str, during=None) -> list[dict]:
    """Both tenants pipeline their steps at once; `during(trainees)` runs meanwhile."""
    trainees = [Trainee(address, tenant) for tenant in range(2)]
    try:
        futures = [t.submit_all() for t in trainees]
        if during is not None:
            during(trainees)
        return [t.fingerprint(f) for t, f in zip(trainees, futures)]
    finally:
        for t in trainees:
            t.close()


def kill_leader(mesh: MeshState) -> None:
    """SIGKILL the leading scheduler; start it again (it stands by under the new leader)."""
    name = leader(mesh)
    kill(mesh, name)
    restart(mesh, name)


@pytest.fixture(scope="module")
def twin(mesh: MeshState) -> list[dict]:
    """The untouched twin: the same two runs, no fault."""
    return train_pair(mesh.scheduler_address)


def test_scheduler_sigkill_mid_pipeline_is_only_latency(mesh: MeshState, twin: list[dict]) -> None:
    after = random.Random(int.from_bytes(os.urandom(4), "little")).randrange(1, 8)  # a random step
    unfinished = []

    def fault(trainees) -> None:
        trainees[0].futures[2 * after].result(timeout=RESULT_TIMEOUT_S)
        unfinished.append(sum(not f.done() for t in trainees for f in t.futures))
        kill_leader(mesh)

    faulted = train_pair(mesh.scheduler_address, during=fault)
    assert unfinished[0] > 0, "the kill came after the pipelines drained: it tested nothing"
    for tenant in range(2):
        assert faulted[tenant]["losses"] == twin[tenant]["losses"], f"tenant {tenant} (kill after step {after})"
        assert faulted[tenant]["logprobs"] == twin[tenant]["logprobs"]
        assert faulted[tenant]["files"] == twin[tenant]["files"]
        assert faulted[tenant]["step"] == faulted[tenant]["checkpoint_step"] == STEPS


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
