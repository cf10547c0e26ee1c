"""The DPO recipe on a real mesh (tiny-dense): held-out preference accuracy and margin rise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tunemesh
from cookbook import dpo


@pytest.mark.e2e
def test_dpo_raises_held_out_preference_accuracy(start_mesh, tmp_path: Path) -> None:
    args = dpo.parser().parse_args([
        "--model", "tunemesh/tiny-dense", "--steps", "8", "--batch", "4", "--lr", "1e-2", "--rank", "8",
        "--train-size", "16", "--eval-size", "12", "--eval-every", "4", "--log-dir", str(tmp_path / "run")])
    with start_mesh(tmp_path / "mesh", samplers=1) as mesh:
        with tunemesh.ServiceClient(mesh.scheduler_address, "tml-demo-alice") as service:
            summary = dpo.train(service, args)
    # the reference is the starting weights, so every margin starts near zero
    assert abs(summary["eval_margin_before"]) < 0.05
    assert summary["eval_margin_after"] > summary["eval_margin_before"] + 0.1
    assert summary["eval_accuracy_after"] >= 0.9 > summary["eval_accuracy_before"]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, 9))
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 4, 8]
    for name in ("loss.png", "accuracy.png", "margin.png", "summary.json"):
        assert (tmp_path / "run" / name).stat().st_size > 0
