"""bench/sample_throughput.py: its pure helpers, and (e2e) a --quick run on tiny-dense."""

from __future__ import annotations

import json
import shutil

import pytest
from bench_loader import bench_module



@pytest.fixture(scope="module")
def bench():
    with bench_module("sample_throughput") as module:
        yield module


def _workload(bench, **changes):
    fields = dict(adapters=2, prompts=3, prompt_len=5, new_tokens=4, rank=8, repeats=1, sync_repeats=1)
    return bench.Workload(**{**fields, **changes})


def test_prompts_are_seeded_per_adapter_and_in_vocab(bench):
    workload = _workload(bench)
    first = bench.prompt_tokens(50, workload, 0)
    assert len(first) == 3 and all(len(row) == 5 for row in first)
    assert all(0 <= token < 50 for row in first for token in row)
    assert first == bench.prompt_tokens(50, workload, 0)
    assert first != bench.prompt_tokens(50, workload, 1)


def test_trim_at_eos_keeps_the_first_eos_and_drops_what_follows(bench):
    rows = [[5, 2, 7, 2], [5, 6, 7, 8], [0, 9, 9, 9]]
    assert bench.trim_at_eos(rows, frozenset({2, 0})) == [[5, 2], [5, 6, 7, 8], [0]]
    assert bench.trim_at_eos(rows, frozenset()) == rows


def test_throughput_summary_rates_the_median_round_of_each_side(bench):
    mesh = [(1.0, 100), (2.0, 100), (10.0, 100)]  # 100, 50, 10 tok/s
    peft = [(4.0, 80), (4.0, 40)]  # 20, 10 tok/s
    summary = bench.throughput_summary(mesh, peft)
    assert summary["mesh_tokens_per_s"] == 50.0
    assert summary["peft_tokens_per_s"] == 15.0
    assert summary["ratio"] == pytest.approx(50 / 15, abs=1e-3)
    assert summary["mesh_tokens"] == [100, 100, 100] and summary["peft_seconds"] == [4.0, 4.0]


def test_rows_agreeing_counts_identical_rows_and_rejects_mismatched_counts(bench):
    assert bench.rows_agreeing([[1, 2], [3], [4]], [[1, 2], [3, 5], [4]]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        bench.rows_agreeing([[1]], [[1], [2]])


def test_quick_flag_shrinks_the_workload_to_tiny_dense(bench):
    args = bench.parse_args(["--quick"])
    assert (args.model, args.adapters, args.prompts, args.new_tokens) == (bench.TINY, 2, 2, 8)
    assert (args.repeats, args.sync_repeats, args.sampler_engine) == (1, 3, "torch")
    assert bench.parse_args([]).model == bench.SMOLLM2


@pytest.mark.e2e
@pytest.mark.slow
def test_quick_run_samples_every_row_and_measures_weight_sync(bench, tmp_path):
    if shutil.which("etcd") is None:
        pytest.skip("etcd binary not installed (Debian: etcd-server)")
    out = tmp_path / "out.json"
    result = bench.main(["--quick", "--data-dir", str(tmp_path / "models"), "--json", str(out)])
    throughput = result["throughput"]
    assert 0 < throughput["mesh_tokens"][0] <= 2 * 2 * 8 and 0 < throughput["peft_tokens"][0] <= 2 * 2 * 8
    assert throughput["mesh_tokens_per_s"] > 0 and throughput["peft_tokens_per_s"] > 0
    assert result["greedy_rows_equal"] >= 0.75  # same adapters, greedy, fp32 (a near-tie may flip one row)
    assert result["weight_sync"]["calls"] == 3 and 0 < result["weight_sync"]["p50_ms"]
    assert json.loads(out.read_text())["model"] == bench.TINY
