"""A real mesh whose trainer is a 2-rank DeepSpeed group with expert parallelism on
tiny-moe: two tenants (one with expert LoRA) train through the SDK, and `tunemesh down`
leaves no rank behind."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

import tunemesh

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.e2e

GROUP_ENV = {"TUNEMESH_TRAINER_RANKS": "2", "TUNEMESH_TRAINER_EXPERT_PARALLEL": "2",
             "TUNEMESH_TRAINER_NUM_THREADS": "1"}


def _datum(seed: int) -> tunemesh.Datum:
    tokens = [int(t) for t in np.random.default_rng(seed).integers(5, 250, 24)]
    return tunemesh.Datum(tunemesh.ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:]})


def _train(service: tunemesh.ServiceClient, train_experts: bool, seed: int, out: dict) -> None:
    trainer = service.create_lora_training_client("tunemesh/tiny-moe", rank=4, seed=seed, train_experts=train_experts)
    data = [_datum(seed), _datum(seed + 1)]
    results = []
    for _ in range(4):
        results.append(trainer.forward_backward(data, "cross_entropy"))
        trainer.optim_step(tunemesh.AdamParams(learning_rate=3e-2))
    out[train_experts] = [r.result(timeout=120).metrics for r in results]


def _rank_workers() -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and b"tunemesh_trainer.ranks" in cmdline:
            found.append(int(proc.name))
    return found


def test_two_rank_expert_parallel_trainer_serves_two_tenants(start_mesh, tmp_path: Path) -> None:
    before = set(_rank_workers())
    with start_mesh(tmp_path / "mesh", models=("tunemesh/tiny-moe",), env=GROUP_ENV) as mesh:
        assert len(set(_rank_workers()) - before) == 1  # rank 1 runs beside the trainer (rank 0)
        metrics: dict = {}
        with tunemesh.ServiceClient(mesh.scheduler_address, "tml-demo-alice") as alice, \
                tunemesh.ServiceClient(mesh.scheduler_address, "tml-demo-bob") as bob:
            threads = [threading.Thread(target=_train, args=(alice, True, 1, metrics)),
                       threading.Thread(target=_train, args=(bob, False, 2, metrics))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=300)
        assert sorted(metrics) == [False, True]
        for steps in metrics.values():
            losses = [m["loss:sum"] for m in steps]
            assert losses[-1] < losses[0], losses
        assert all(m["e_frac_with_tokens:mean"] > 0 for m in metrics[True])
        log = Path(mesh.state_dir, "logs", "trainer-0.log").read_text()
        assert "rank 1/2" in log and "2 experts per layer here" in log
    assert set(_rank_workers()) - before == set()
