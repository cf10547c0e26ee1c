"""The distillation recipe on a real mesh (tiny-dense): a student fine-tuned away from the base model is
distilled back towards it (teacher = base); the held-out reverse KL falls."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import tunemesh
from cookbook import common, distill, tasks


def _drifted_student(service: tunemesh.ServiceClient, steps: int = 8) -> str:
    """A state checkpoint that answers 'number' prompts with random numbers: far from the base model."""
    training = service.create_lora_training_client("tunemesh/tiny-dense", rank=8, seed=1)
    renderer = common.Renderer(training.get_tokenizer())
    rng = random.Random(5)
    data = [renderer.supervised(p.messages(), str(rng.randint(10, 10**9)))
            for p in tasks.problems(tasks.task("number"), 16, seed=5)]
    for _ in range(steps):
        training.forward_backward(data, "cross_entropy")
        training.optim_step(tunemesh.AdamParams(learning_rate=1e-2))
    return training.save_state("drifted").result().path


@pytest.mark.e2e
def test_distill_back_to_the_base_lowers_held_out_reverse_kl(start_mesh, tmp_path: Path) -> None:
    with start_mesh(tmp_path / "mesh", samplers=1) as mesh:
        with tunemesh.ServiceClient(mesh.scheduler_address, "tml-demo-alice") as service:
            args = distill.parser().parse_args([
                "--model", "tunemesh/tiny-dense", "--student-init", _drifted_student(service), "--teacher", "base",
                "--context", "none", "--task", "number",
                "--max-tokens", "4", "--lr", "1e-2", "--rank", "8", "--steps", "8", "--batch", "8", "--samples", "4",
                "--eval-size", "16", "--eval-every", "4", "--log-dir", str(tmp_path / "run")])
            summary = distill.train(service, args)
    assert summary["eval_kl_after"] < 0.5 * summary["eval_kl_before"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reverse_kl" in r] == list(range(1, 9))
    assert [r["step"] for r in rows if "eval_kl" in r] == [0, 4, 8]
    for name in ("loss.png", "kl.png", "accuracy.png", "summary.json"):
        assert (tmp_path / "run" / name).stat().st_size > 0
