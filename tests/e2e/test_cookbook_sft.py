"""The SFT recipe on a real mesh (tiny-dense): held-out NLL falls, metrics and plots are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tunemesh
from cookbook import sft


@pytest.mark.e2e
def test_sft_lowers_held_out_nll_and_writes_metrics_and_plots(start_mesh, tmp_path: Path) -> None:
    args = sft.parser().parse_args([
        "--model", "tunemesh/tiny-dense", "--steps", "10", "--batch", "8", "--lr", "1e-2", "--rank", "8",
        "--train-size", "32", "--eval-size", "8", "--eval-every", "5", "--max-tokens", "4",
        "--log-dir", str(tmp_path / "run")])
    with start_mesh(tmp_path / "mesh", samplers=1) as mesh:
        with tunemesh.ServiceClient(mesh.scheduler_address, "tml-demo-alice") as service:
            summary = sft.train(service, args)
    assert summary["eval_nll_after"] < summary["eval_nll_before"] - 1.0
    assert 0.0 <= summary["eval_accuracy_after"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_nll" in r] == list(range(1, 11))
    assert [r["step"] for r in rows if "eval_nll" in r] == [0, 5, 10]
    for name in ("loss.png", "accuracy.png", "summary.json"):
        assert (tmp_path / "run" / name).stat().st_size > 0
