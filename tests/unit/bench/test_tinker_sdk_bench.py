"""bench/tinker_sdk.py on tiny-dense: both SDKs train through one mesh (the official one
through the gateway) and the report's ratio is the one its round times give."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[3] / "bench"
pytestmark = pytest.mark.e2e


def test_tinker_sdk_bench_runs_both_sdks_and_reports_their_ratio(tmp_path, monkeypatch, model_data_dir):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import tinker_sdk

    out = tmp_path / "tinker_sdk.json"
    result = tinker_sdk.main(["--tenants", "2", "--steps", "2", "--warmup", "1", "--rounds", "2",
                              "--data-dir", str(model_data_dir), "--json", str(out)])
    assert json.loads(out.read_text()) == result
    (row,) = result["rows"]
    assert row["tenants"] == 2 and len(row["round_ratios"]) == 2
    assert row["native_step_ms_p50"] > 0 and row["gateway_step_ms_p50"] > 0
    assert row["gateway_over_native_p50"] == pytest.approx(sorted(row["round_ratios"])[0] / 2 + sorted(row["round_ratios"])[1] / 2, abs=2e-3)
    sys.modules.pop("tinker_sdk", None)
