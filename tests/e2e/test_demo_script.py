"""The demo script end to end on the tiny model: mesh up, two tenants train and sample, mesh down."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_demo_trains_two_tenants_and_stops_the_mesh(tmp_path):
    env = dict(os.environ, no_proxy="127.0.0.1,localhost", HF_HUB_OFFLINE="1",
               TUNEMESH_DATA_DIR=os.environ.get("TUNEMESH_DATA_DIR", str(tmp_path / "data")))
    state_dir = tmp_path / "mesh"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--model", "tunemesh/tiny-dense", "--steps", "6",
         "--lr", "1e-2", "--state-dir", str(state_dir)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "both tenants' losses fell" in result.stdout
    for tenant in ("alice", "bob"):
        line = next(l for l in result.stdout.splitlines() if l.strip().startswith(f"{tenant}: loss/token"))
        first, last = (float(x) for x in line.split("loss/token")[1].split("->"))
        assert last < first
    for tenant, question in (("alice", "What is tunemesh?"), ("bob", "How are you today?")):
        assert f"{tenant}: {question}" in result.stdout  # answers before | after training, from the sampler
    assert result.stdout.count("before training") == 2
    assert not (state_dir / "mesh.json").exists(), "the demo must stop the mesh it started"
