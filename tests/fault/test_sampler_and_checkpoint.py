"""Faults of the services around training: the sampler dies during an RL-style
sample/train loop (its requests are sent again once a sampler serves, seeded samples give
the same tokens), and the checkpoint service dies while runs train and save (snapshots
and saves wait for it, nothing fails). Each against an untouched twin, bit for bit."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from fault_ops import MODEL, kill, restart
from twin_runs import ADAM, TENANTS, assert_matches_twin, train_pair

import tunemesh
from tunemesh_local.state import MeshState

pytestmark = pytest.mark.e2e

ITERATIONS = 6
PROMPT = [5, 6, 7, 8]


def rl_loop(address: str, during=None) -> list:
    """ITERATIONS of: save weights, sample 2 seeded continuations, reward the ones with
    more even tokens, train on them; returns every sample's tokens and every loss."""
    trace = []
    with tunemesh.ServiceClient(address, api_key=TENANTS[1]) as client:
        training = client.create_lora_training_client(MODEL, rank=4, seed=21)
        for step in range(ITERATIONS):
            if during is not None and step == 2:
                during()
            sampler = training.save_weights_and_get_sampling_client()
            params = tunemesh.SamplingParams(max_tokens=6, temperature=1.0, seed=100 + step)
            sampled = sampler.sample(tunemesh.ModelInput.from_ints(PROMPT), 2, params).result(timeout=180)
            data = []
            for seq in sampled.sequences:
                reward = sum(1.0 for t in seq.tokens if t % 2 == 0) / len(seq.tokens)
                tokens = PROMPT + list(seq.tokens)
                data.append(tunemesh.Datum(tunemesh.ModelInput.from_ints(tokens[:-1]), {
                    "target_tokens": np.asarray(tokens[1:], dtype=np.int64),
                    "weights": np.asarray([0.0] * (len(PROMPT) - 1) + [reward] * len(seq.tokens), dtype=np.float32)}))
                trace.append(list(seq.tokens))
            trace.append(training.forward_backward(data).result(timeout=180).metrics["loss:sum"])
            training.optim_step(ADAM).result(timeout=180)
    return trace


def test_sampler_sigkill_in_an_rl_loop_is_only_latency(fault_mesh: MeshState) -> None:
    twin = rl_loop(fault_mesh.scheduler_address)
    revived = threading.Event()

    def fault() -> None:
        kill(fault_mesh, "sampler-0")

        def revive() -> None:
            threading.Event().wait(2.0)  # requests made meanwhile wait for it
            restart(fault_mesh, "sampler-0")
            revived.set()

        threading.Thread(target=revive, daemon=True).start()

    faulted = rl_loop(fault_mesh.scheduler_address, during=fault)
    assert revived.wait(180)
    assert faulted == twin


def test_checkpoint_service_sigkill_while_training_and_saving(fault_mesh: MeshState, twin: list[dict]) -> None:

    def fault(trainees) -> None:
        trainees[0].futures[6].result(timeout=120)
        kill(fault_mesh, "checkpoint")
        saved = trainees[1].training.save_state("during-outage")  # waits for the service
        threading.Event().wait(2.0)
        restart(fault_mesh, "checkpoint")
        assert saved.result(timeout=120).path.endswith("/during-outage")

    faulted = train_pair(fault_mesh.scheduler_address, during=fault)
    assert_matches_twin(faulted, twin)
