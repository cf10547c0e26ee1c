"""The fault suite's workload: two tenants pipelining STEPS training steps each on
tiny-dense, and what must equal an untouched twin run bit for bit (per-step losses,
final logprobs, saved adapter and optimizer files, optimizer steps taken)."""

from __future__ import annotations

import numpy as np
from fault_ops import MODEL

import tunemesh

VOCAB = 1024
TENANTS = ("tml-demo-alice", "tml-demo-bob")
STEPS = 24
RESULT_TIMEOUT_S = 120
ADAM = tunemesh.AdamParams(learning_rate=1e-2)


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


def assert_matches_twin(faulted: list[dict], twin: list[dict], note: str = "") -> None:
    for tenant in range(2):
        assert faulted[tenant]["losses"] == twin[tenant]["losses"], f"tenant {tenant} {note}"
        assert faulted[tenant]["logprobs"] == twin[tenant]["logprobs"], f"tenant {tenant} {note}"
        assert faulted[tenant]["files"] == twin[tenant]["files"], f"tenant {tenant} {note}"
        assert faulted[tenant]["step"] == faulted[tenant]["checkpoint_step"] == STEPS, f"tenant {tenant} {note}"
