"""bench/moe_throughput.py: its pure helpers, and tiny runs (in process; 2 DeepSpeed ranks)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench" / "moe_throughput.py"
TINY = ["--tenants", "2", "--repeats", "1", "--rows", "2", "--seq-len", "16"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("moe_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("moe-bench-models")


def test_ratios_use_medians_and_skip_missing_sides(bench):
    workload = bench.Workload(tenants=2, rows=3, seq_len=10, steps=2)
    fused = bench.side_figures(workload, "2", [1.0, 9.0, 2.0])
    peft = bench.side_figures(workload, "2", [4.0, 4.0, 100.0])
    assert fused["tokens_per_s"] == pytest.approx(120 / 2.0)
    assert bench.ratios({"fused": fused, "peft_sequential": peft}) == {"fused / peft_sequential": 2.0}


def test_correctness_fails_when_lora_differs(bench):
    base = [100.0, 2000.0]
    peft = [[101.0, 100.5], [1999.0, 1998.0]]
    assert bench.correctness(peft, peft, base)["ok"]
    loss_off = [[101.0 * (1 + 2e-4), 100.5], peft[1]]  # loss beyond rel 1e-4
    assert not bench.correctness(loss_off, peft, base)["ok"]
    delta_off = [peft[0], [1999.0 + 0.05, 1998.0]]  # within rel 1e-4 of the loss, 5 % of LoRA's share
    check = bench.correctness(delta_off, peft, base)
    assert check["max_rel_err_first_step"] <= bench.RTOL and not check["ok"]
    assert check["max_rel_err_lora_delta"] == pytest.approx(0.05)


def test_tiny_run_measures_fused_and_peft_on_equal_work(bench, data_dir, tmp_path):
    out = tmp_path / "moe.json"
    results = bench.main([*TINY, "--ranks", "", "--data-dir", str(data_dir), "--json", str(out)])
    assert json.loads(out.read_text()) == results
    assert {"fused", "peft_sequential"} <= results["sides"].keys()
    for side in results["sides"].values():
        assert len(side["seconds"]) == 1 and side["tokens_per_s"] > 0
    assert "fused / peft_sequential" in results["ratios"]
    check = results["correctness"]
    assert check["ok"] and check["max_rel_err_first_step"] <= bench.RTOL
    # LoRA moves every loss far beyond float32 rounding, and its share agrees: the check can fail
    assert check["min_lora_effect_rel"] > 1e-6 and check["max_rel_err_lora_delta"] <= bench.DELTA_RTOL
    assert check["max_rel_err_all_steps"] <= bench.RTOL  # two steps, the same AdamW on both sides


@pytest.mark.slow
def test_tiny_run_on_two_deepspeed_ranks(bench, data_dir, tmp_path):
    pytest.importorskip("deepspeed")
    results = bench.main([*TINY, "--ranks", "2", "--data-dir", str(data_dir), "--json", str(tmp_path / "m.json")])
    side = results["sides"]["deepspeed_2_ranks"]
    assert side["threads"] == "2x1" and side["tokens_per_s"] > 0
    assert "deepspeed_2_ranks / fused" in results["ratios"]
    assert results["deepspeed_vs_torch_max_rel_err"]["deepspeed_2_ranks"] <= 1e-5
    assert results["sides"]["deepspeed_2_ranks_ep2"]["tokens_per_s"] > 0  # --ep-ranks defaults to 2
    assert results["deepspeed_vs_torch_max_rel_err"]["deepspeed_2_ranks_ep2"] <= 1e-5
    assert "deepspeed_2_ranks_ep2 / deepspeed_2_ranks" in results["ratios"]
