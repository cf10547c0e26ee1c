"""bench/checkpoint_latency.py: its pure helpers, and (e2e) a --quick run on tiny-dense."""

from __future__ import annotations

import shutil

import pytest
from bench_loader import bench_module



@pytest.fixture(scope="module")
def bench():
    with bench_module("checkpoint_latency") as module:
        yield module


def test_summarize_reports_medians_and_ratios(bench):
    mesh = {op: [0.1, 0.3, 0.2] for op in bench.OPERATIONS}
    local = {op: [0.4, 0.4, 9.0] for op in bench.OPERATIONS}
    row = bench.summarize(8, {"state": 3 << 20, "sampler": 1 << 20}, mesh, local)
    assert (row["rank"], row["state_mb"], row["sampler_mb"]) == (8, 3.0, 1.0)
    for op in bench.OPERATIONS:
        assert (row[f"{op}_ms"], row[f"{op}_local_ms"], row[f"{op}_ratio"]) == (200.0, 400.0, 0.5)
    report = bench.format_report({"model": "m", "repeats": 3, "rows": [row]})
    assert "200 / 400 = 0.5" in report and report.count("\n") == 2


@pytest.mark.e2e
@pytest.mark.slow
def test_quick_run_measures_every_operation(bench, tmp_path, monkeypatch):
    if shutil.which("etcd") is None:
        pytest.skip("etcd binary not installed (Debian: etcd-server)")
    result = bench.main(["--quick", "--data-dir", str(tmp_path / "models"), "--json", str(tmp_path / "out.json")])
    assert [r["rank"] for r in result["rows"]] == [8, 32]
    small, large = result["rows"]
    assert large["sampler_mb"] > 3 * small["sampler_mb"]  # rank 32 vs 8: about 4x the bytes
    assert small["state_mb"] > 2.5 * small["sampler_mb"]  # weights + two AdamW moments
    assert all(r[f"{op}_ms"] > 0 for r in result["rows"] for op in bench.OPERATIONS)
    assert (tmp_path / "out.json").exists()
