"""The demo script end to end on the tiny model: mesh up, SFT and RL tenants at once, mesh down."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_demo_runs_an_sft_and_an_rl_tenant_and_stops_the_mesh(tmp_path):
    env = dict(os.environ, no_proxy="127.0.0.1,localhost", HF_HUB_OFFLINE="1",
               TUNEMESH_DATA_DIR=os.environ.get("TUNEMESH_DATA_DIR", str(tmp_path / "data")))
    state_dir, out = tmp_path / "mesh", tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--model", "tunemesh/tiny-dense", "--sft-steps", "4",
         "--rl-steps", "3", "--rl-task", "number", "--rl-eval-size", "16", "--state-dir", str(state_dir), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "alice's held-out NLL fell" in result.stdout
    summaries = {t: json.loads((out / d / "summary.json").read_text()) for t, d in (("alice", "alice-sft"), ("bob", "bob-rl"))}
    assert summaries["alice"]["eval_nll_after"] < summaries["alice"]["eval_nll_before"]
    for tenant, summary in summaries.items():
        assert f"{tenant}: {summary['example']['prompt']}" in result.stdout  # a held-out answer before | after
        assert (pathlib.Path(summary["log_dir"]) / "metrics.jsonl").stat().st_size > 0
        assert list(pathlib.Path(summary["log_dir"]).glob("*.png"))
    assert result.stdout.count("before training") == 2
    bob = summaries["bob"]
    assert bob["eval_size"] == 16  # held-out size, printed next to the accuracy
    assert f"{bob['eval_accuracy_before']:.1%} -> {bob['eval_accuracy_after']:.1%} (16)" in result.stdout
    assert not (state_dir / "mesh.json").exists(), "the demo must stop the mesh it started"
