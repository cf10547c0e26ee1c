"""bench/engine_step.py on tiny-dense: a fused step runs, its figures are consistent."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[3] / "bench"


def test_engine_step_reports_tokens_per_second_and_mfu(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import engine_step

    out = tmp_path / "step.json"
    result = engine_step.main(["--model", "tunemesh/tiny-dense", "--adapters", "2", "--rows", "1", "--seq-len", "8",
                               "--rank", "4", "--repeats", "2", "--data-dir", str(tmp_path / "data"),
                               "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert len(result["step_seconds"]) == 2 and result["tokens_per_s"] > 0
    gflop = result["training_gflop_per_token"] * 1e9
    want = result["tokens_per_s"] * gflop / (result["machine"]["fp32_gflops"] * 1e9)
    assert abs(result["mfu"] - want) < 1e-3 and 0 < result["mfu"] < 1
    sys.modules.pop("engine_step", None)
