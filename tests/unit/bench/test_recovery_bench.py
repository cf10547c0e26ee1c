"""bench/recovery.py: its pure helpers (no mesh)."""

from __future__ import annotations

import threading
import time

import pytest
from bench_loader import bench_module



@pytest.fixture(scope="module")
def bench():
    with bench_module("recovery") as module:
        yield module


def test_recovery_sample_separates_results_already_in_flight(bench):
    times = [9.0, 10.004, 10.01, 14.5, 14.6]  # two results land just after the kill at 10.0
    sample = bench.recovery_sample(times, 10.0)
    assert sample == {"first_s": 0.004, "in_flight": 2, "recovered_s": 4.5}
    assert bench.recovery_sample([9.0, 13.0], 10.0) == {"first_s": 3.0, "in_flight": 0, "recovered_s": 3.0}
    assert bench.recovery_sample([9.0], 10.0) == {"first_s": None, "in_flight": 0, "recovered_s": None}


def test_step_period_counts_two_futures_per_step(bench):
    times = [0.5 * i for i in range(21)]  # a future every 0.5 s: a step every 1 s
    assert bench.step_period_s(times, 0.0, 10.0) == pytest.approx(2 * 10.0 / 21)
    assert bench.step_period_s(times, 100.0, 101.0) is None  # nothing resolved there


def test_recent_step_period_is_the_median_over_runs_of_the_last_window(bench):
    every_s = [[0.5 * i for i in range(81)], [1.0 * i for i in range(41)]]  # a step per 1 s and per 2 s
    assert bench.recent_step_period_s(every_s, 40.0, window_s=10.0) == pytest.approx((2 * 10 / 21 + 2 * 10 / 11) / 2)
    assert bench.recent_step_period_s(every_s, 200.0) is None


def test_a_kill_comes_at_once_after_a_round_or_at_a_random_point_of_a_step(bench):
    import random

    rng = random.Random(0)
    assert bench.kill_pause_s(rng, 8.0, "round-end") == 0.0
    assert bench.kill_pause_s(rng, None, "random") == 0.0  # no period known: at once
    pauses = [bench.kill_pause_s(rng, 8.0, "random") for _ in range(200)]
    assert 0.0 <= min(pauses) < 1.0 and 7.0 < max(pauses) < 8.0


def test_recovery_summary_without_a_step_period_gives_no_ratio_to_it(bench):
    kills = [{"runs": {"a": {"first_s": 4.0, "in_flight": 0, "recovered_s": 4.0}}, "restart_s": 9.0,
              "scheduler_log": {"replayed_calls": {}}}]
    summary = bench.recovery_summary(kills, None, per_kill={"lease_ttl": 5.0})
    assert summary["step_period_s"] is None and summary["ratios"] == {"recovered_p50_over_lease_ttl": 0.8}


def test_recovery_summary_pools_every_affected_run_of_every_kill(bench):
    kills = [{"runs": {"a": {"first_s": 0.01, "in_flight": 1, "recovered_s": 5.0},
                       "b": {"first_s": 6.0, "in_flight": 0, "recovered_s": 6.0}},
              "restart_s": 9.0, "scheduler_log": {"trainer_left_s": 4.0, "replayed_calls": {"a": 3, "b": 5}}},
             {"runs": {"a": {"first_s": 4.0, "in_flight": 0, "recovered_s": 4.0}},
              "restart_s": 11.0, "scheduler_log": {"trainer_left_s": 3.0, "replayed_calls": {"a": 10}}}]
    summary = bench.recovery_summary(kills, baseline_s=0.1, per_kill={"lease_ttl": 5.0})
    assert summary["kills"] == 2 and summary["recovered"]["n"] == 3
    assert summary["recovered"]["p50_s"] == 5.0 and summary["recovered"]["max_s"] == 6.0
    assert summary["first"]["p50_s"] == 4.0
    assert summary["samples_with_in_flight"] == 1
    assert summary["ratios"] == {"recovered_p50_over_step_period": 50.0, "recovered_p50_over_lease_ttl": 1.0}
    assert summary["breakdown_p50_s"] == {"trainer_left_s": 3.5, "restart_s": 10.0, "replayed_calls_per_run": 5.0}


def test_log_events_reads_the_scheduler_log_after_the_kill(bench):
    text = "\n".join([
        "2026-12-06 01:09:05,111 WARNING tunemesh_scheduler.nodes: trainer trainer-9 left",  # before the kill
        "2026-12-06 01:09:22,132 WARNING tunemesh_scheduler.nodes: trainer trainer-1 left",
        "2026-12-06 01:09:22,137 INFO tunemesh_scheduler.core.failover: moving runs/a from trainer-1 to trainer-0",
        "Loading weights: 100%|##########| 25/25",
        "2026-12-06 01:09:22,351 INFO tunemesh_scheduler.core.machine: replayed 11 calls of runs/a on trainer-0 [run=runs/a]",
        "2026-12-06 01:09:22,386 INFO tunemesh_scheduler.core.failover: replayed 15 calls of runs/b on trainer-0",
        "2026-12-06 01:09:23,000 INFO tunemesh_scheduler.takeover: recovered 2 sessions, 4 runs, 3 queued operations",
        "2026-12-06 01:09:22,900 INFO tunemesh_common.membership.leadership: leading /tunemesh/leaders/scheduler (token 9)",
        "2026-12-06 01:09:23,100 INFO tunemesh_scheduler: scheduler leading and serving on 127.0.0.1:1 (token 9)",
    ])
    entries = bench.log_entries(text)
    assert len(entries) == 8
    kill = entries[1][0] - 2.132  # 01:09:20,000
    events = bench.log_events(entries, kill)
    assert events["trainer_left_s"] == pytest.approx(2.132)
    assert events["replayed_calls"] == {"runs/a": 11, "runs/b": 15}
    assert events["last_replay_s"] == pytest.approx(2.386)
    assert events["recovered_state_s"] == pytest.approx(3.0) and "4 runs" in events["recovered"]
    assert events["leading_s"] == pytest.approx(2.9) and events["serving_s"] == pytest.approx(3.1)
    single = bench.log_entries("2026-12-06 01:09:23,100 INFO tunemesh_scheduler: scheduler serving on 127.0.0.1:1")
    assert bench.log_events(single, kill)["serving_s"] == pytest.approx(3.1)  # before scheduler replicas


def test_price_order_alternates_and_mirrors_groups(bench):
    assert bench.price_order(3) == ["on", "off", "off", "on", "on", "off"]
    assert bench.price_order(2, ("on", "off", "journal")) == ["on", "off", "journal", "journal", "off", "on"]


def test_price_summary_is_the_ratio_of_medians(bench):
    tps = {"on": [90.0, 99.0, 500.0], "off": [100.0, 110.0, 90.0], "journal": [100.0, 55.0, 99.0]}
    rounds = [{"mode": mode, "tokens_per_s": value} for mode, values in tps.items() for value in values]
    summary = bench.price_summary(rounds)
    assert (summary["on_tokens_per_s"], summary["off_tokens_per_s"]) == (99.0, 100.0)
    assert summary["ratio_on_off"] == 0.99 and summary["ratio_journal_off"] == 0.99
    assert summary["group_ratios_on_off"] == [0.9, 0.9, 5.556]
    assert "ratio_off_off" not in summary


class _Future:
    def __init__(self, error: BaseException | None = None) -> None:
        self._error = error

    def exception(self):
        return self._error


def test_run_trace_wakes_a_waiter_on_a_later_resolution(bench):
    trace = bench.RunTrace()
    trace.note(_Future())
    t = time.monotonic()
    assert not trace.wait_after(t, 0.05)  # nothing after t yet
    threading.Timer(0.05, trace.note, args=(_Future(),)).start()
    assert trace.wait_after(t, 5.0)
    assert len(trace.times()) == 2 and trace.times()[1] > t


def test_run_trace_stops_waiting_on_a_failed_future(bench):
    trace = bench.RunTrace()
    trace.note(_Future(RuntimeError("boom")))
    assert not trace.wait_after(0.0, 5.0)
    assert trace.errors == ["RuntimeError('boom')"]


def test_environ_restores_what_it_set(bench, monkeypatch):
    monkeypatch.setenv("TUNEMESH_BENCH_KEPT", "a")
    monkeypatch.delenv("TUNEMESH_BENCH_NEW", raising=False)
    import os

    with bench.environ({"TUNEMESH_BENCH_KEPT": "b", "TUNEMESH_BENCH_NEW": "c"}):
        assert (os.environ["TUNEMESH_BENCH_KEPT"], os.environ["TUNEMESH_BENCH_NEW"]) == ("b", "c")
    assert os.environ["TUNEMESH_BENCH_KEPT"] == "a" and "TUNEMESH_BENCH_NEW" not in os.environ


def test_workload_defaults_per_model(bench):
    tiny = bench.price_workload(bench.parse_args([]))
    assert (tiny.batch, tiny.seq_len, tiny.steps, tiny.warmup) == (1, 32, 96, 4)
    smol = bench.price_workload(bench.parse_args(["--model", bench.SMOLLM2]))
    assert (smol.batch, smol.seq_len, smol.steps, smol.warmup) == (2, 64, 8, 1)
    args = bench.parse_args(["--parts", "trainer,price", "--between-s", "1,2"])
    assert args.parts == ["trainer", "price"] and args.between_s == (1.0, 2.0)
    with pytest.raises(SystemExit):
        bench.parse_args(["--parts", "trainer,etcd"])


def test_format_report_names_every_part(bench):
    kills = [{"runs": {"a": {"first_s": 4.0, "in_flight": 0, "recovered_s": 4.0}}, "restart_s": 1.0,
              "scheduler_log": {"replayed_calls": {}}}]
    rounds = [{"mode": "on", "tokens_per_s": 95.0}, {"mode": "off", "tokens_per_s": 100.0}]
    result = {"model": "m", "cpu_count": 2, "load_average_1m": [1.0, 2.0],
              "recovery": {"trainer": bench.recovery_summary(kills, 0.5, {"lease_ttl": 5.0})},
              "price": {"summary": bench.price_summary(rounds)}}
    report = bench.format_report(result)
    assert "trainer SIGKILL, 1 kills: recovered p50 4.0 s" in report
    assert "durability on/off: 95.0 / 100.0 tok/s = 0.95" in report
