"""bench/fairness.py's pure parts: the backlogged window and the figures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
import fairness  # noqa: E402


def test_token_shares_count_only_the_window_where_every_tenant_was_backlogged():
    done_at = {"A": [1.0, 2.0, 3.0, 4.0, 9.0], "B": [2.5, 3.5, 5.0]}
    # window [2.5, 5.0]: A's ops at 3.0, 4.0 (2 x 10 tokens); B's at 2.5, 3.5, 5.0 (3 x 10)
    shares = fairness.token_shares(done_at, {"A": 10, "B": 10})
    assert shares == pytest.approx({"A": 0.4, "B": 0.6})


def test_summary_ratios_and_the_p99_bound():
    rounds = {"solo": [0.010] * 10, "flood_1_run": [0.020] * 10, "flood_8_runs": [0.022] * 10}
    out = fairness.summarize(rounds, [0.050, 0.040, 0.060], {"A": 0.5, "B": 0.5})
    assert out["a_runs_ratio"] == pytest.approx(1.1)
    assert out["b_p99_bound_ms"] == pytest.approx(10.0 + 1.5 * 50.0)
    assert out["b_p99_within_bound"] is True
    slow = fairness.summarize({**rounds, "flood_8_runs": [0.2] * 10}, [0.050], {"A": 0.5, "B": 0.5})
    assert slow["b_p99_within_bound"] is False
