"""Sampling with real processes: etcd, checkpoint service, trainer, sampler, scheduler."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import tunemesh
from mesh_tls import etcdctl

PROMPT = [5, 6, 7, 8]
ANSWER = [60, 61, 62, 63, 64, 65]
GREEDY = tunemesh.SamplingParams(max_tokens=len(ANSWER), temperature=0.0)


def _teach(trainer: tunemesh.TrainingClient, steps: int) -> None:
    tokens = PROMPT + ANSWER
    datum = tunemesh.Datum(tunemesh.ModelInput.from_ints(tokens[:-1]), {
        "target_tokens": tokens[1:], "weights": [0.0] * (len(PROMPT) - 1) + [1.0] * len(ANSWER)})
    for step in range(steps):
        trainer.forward_backward([datum], "cross_entropy")
        done = trainer.optim_step(tunemesh.AdamParams(learning_rate=1e-2))
        if step % 10 == 9:
            done.result(timeout=120)


def test_sampler_serves_new_weights_and_registers_what_it_holds(start_mesh, tmp_path: Path) -> None:
    with start_mesh(tmp_path / "mesh", samplers=1) as mesh:
        with tunemesh.ServiceClient(mesh.scheduler_address, "tml-demo-alice") as alice:
            trainer = alice.create_lora_training_client("tunemesh/tiny-dense", rank=8, seed=4)
            base = alice.create_sampling_client(base_model="tunemesh/tiny-dense")
            before = base.sample(tunemesh.ModelInput.from_ints(PROMPT), 1, GREEDY).result(timeout=120)
            _teach(trainer, 60)
            sampler = trainer.save_weights_and_get_sampling_client("taught")
            after = sampler.sample(tunemesh.ModelInput.from_ints(PROMPT), 1, GREEDY).result(timeout=120)
            assert after.sequences[0].tokens == ANSWER != before.sequences[0].tokens
            logprobs = sampler.compute_logprobs(tunemesh.ModelInput.from_ints(PROMPT + ANSWER)).result(timeout=120)
            datum = tunemesh.Datum(tunemesh.ModelInput.from_ints((PROMPT + ANSWER)[:-1]),
                                   {"target_tokens": (PROMPT + ANSWER)[1:]})
            forward = trainer.forward([datum], "cross_entropy").result(timeout=120)
            np.testing.assert_allclose(logprobs[1:], forward.loss_fn_outputs[0]["logprobs"].to_numpy(), atol=1e-4)
            with tunemesh.ServiceClient(mesh.scheduler_address, "tml-demo-bob") as bob:
                with pytest.raises(tunemesh.NotFoundError):
                    bob.create_sampling_client(model_path=sampler.model_path)
        record = _sampler_record(mesh)
        assert record.node_id == "sampler-0" and record.models[0].name == "tunemesh/tiny-dense"
        assert len(record.resident_adapters) == 1  # the taught adapter, by key (no tenant or path)
        assert "alice" not in record.resident_adapters[0]


def _sampler_record(mesh):
    from tunemesh_internal.v1 import sampler_pb2

    deadline = time.monotonic() + 10
    while True:  # the sampler refreshes its record twice a second
        out = subprocess.run([*etcdctl(mesh), "get", "--prefix", "/tunemesh/nodes/samplers/",
                              "-w", "json"], capture_output=True, text=True, timeout=30,
                             env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})
        kvs = json.loads(out.stdout).get("kvs", [])
        record = sampler_pb2.SamplerNode.FromString(base64.b64decode(kvs[0]["value"])) if kvs else None
        if (record is not None and record.resident_adapters) or time.monotonic() > deadline:
            return record
        time.sleep(0.3)
