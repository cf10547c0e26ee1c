"""bench/train_throughput.py: its pure helpers, and (e2e) a --quick run on tiny-dense."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench" / "train_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_token_rows_are_seeded_and_in_vocab(bench):
    rows = bench.token_rows(50, 3, 7, seed=5)
    assert rows.shape == (3, 8) and rows.dtype == np.int64
    assert rows.min() >= 0 and rows.max() < 50
    assert np.array_equal(rows, bench.token_rows(50, 3, 7, seed=5))
    assert not np.array_equal(rows, bench.token_rows(50, 3, 7, seed=6))


def test_throughput_row_uses_medians_of_the_rounds(bench):
    workload = bench.Workload(batch=4, seq_len=64, steps=10, warmup=1, rank=8)
    row = bench.throughput_row(workload, 2, mesh_s=[1.0, 9.0, 2.0], peft_s=[4.0, 4.0, 100.0])
    tokens = 2 * 4 * 64 * 10
    assert row["tokens_per_repeat"] == tokens
    assert row["mesh_tokens_per_s"] == pytest.approx(tokens / 2.0, abs=0.1)
    assert row["peft_tokens_per_s"] == pytest.approx(tokens / 4.0, abs=0.1)
    assert row["ratio"] == pytest.approx(2.0)


def test_overhead_summary_subtracts_stage_percentiles(bench):
    stages = {
        "sdk": [0.010] * 10 + [0.030] * 10,
        "engine": [0.004] * 20,
        "public_rpc": [0.009] * 20,
        "trainer_rpc": [0.006] * 20,
        "trainer_engine": [0.005] * 20,
    }
    summary = bench.overhead_summary(stages)
    assert summary["calls"] == 20
    assert summary["stages"]["sdk"]["p50_ms"] == pytest.approx(20.0)
    assert summary["overhead_p50_ms"] == pytest.approx(16.0)
    assert summary["overhead_p95_ms"] == pytest.approx(26.0)
    assert sum(summary["breakdown_p50_ms"].values()) == pytest.approx(20.0)
    report = bench.format_report({"models": [], "overhead": {"model": "m", **summary}})
    assert "16.000" in report


def test_timed_rounds_times_concurrent_tenants(bench):
    calls = []

    def tenant(steps: int) -> None:
        calls.append(steps)
        time.sleep(0.1 * steps)

    seconds = bench.timed_rounds([tenant, tenant, tenant], warmup=1, steps=5, repeats=2)
    assert len(seconds) == 2
    assert sorted(calls) == [1, 1, 1, 5, 5, 5, 5, 5, 5]
    # concurrent: about one tenant's 0.5 s, far from the 1.5 s of three in a row
    assert all(0.5 <= s < 1.2 for s in seconds)


def test_timed_rounds_raises_a_tenants_error(bench):
    def broken(steps: int) -> None:
        if steps == 5:
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        bench.timed_rounds([broken, lambda steps: None], warmup=1, steps=5, repeats=2)


def test_trainers_share_the_bench_model_cache(bench):
    argv = ("python", "-m", "tunemesh_trainer", "--data-dir", "/state/trainers/t0", "--model", "m")
    assert bench._with_data_dir(argv, Path("/cache")) == (
        "python", "-m", "tunemesh_trainer", "--data-dir", "/cache", "--model", "m")


@pytest.mark.e2e
def test_quick_run_writes_figures(bench, tmp_path):
    if shutil.which("etcd") is None:
        pytest.skip("etcd binary not installed (Debian: etcd-server)")
    out = tmp_path / "figures.json"
    results = bench.main(["--quick", "--steps", "2", "--overhead-calls", "4", "--overhead-warmup", "1",
                          "--data-dir", str(tmp_path / "data"), "--json", str(out)])
    assert json.loads(out.read_text()) == results
    (model,) = results["models"]
    assert [row["tenants"] for row in model["rows"]] == [1, 2]
    for row in model["rows"]:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert row["mesh_tokens_per_s"] > 0 and row["peft_tokens_per_s"] > 0
    stages = results["overhead"]["stages"]
    assert {"sdk", "engine", "public_rpc", "trainer_rpc", "trainer_engine"} <= stages.keys()
    assert stages["trainer_rpc"]["p50_ms"] >= stages["trainer_engine"]["p50_ms"]
