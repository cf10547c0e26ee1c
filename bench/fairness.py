"""Fairness between tenants on one trainer: tenant A floods, tenant B sends small operations.

    python bench/fairness.py                       # tiny-dense, the figures below
    python bench/fairness.py --json bench/results/fairness.json

A mesh (etcd, scheduler, one trainer) runs on loopback through the launcher; A and B are
two tenants (two API keys), A in a process of its own. B sends one small forward_backward at a time (1 x 32 tokens)
and times each; A floods forward_backward operations of 4 x 64 tokens. Measured in one
run, as ratios (the aims of issue 15, item 2):

  (a) B's p50 with A's flood spread over 8 runs / B's p50 with the same flood on 1 run
      (aim <= 1.2: A's number of runs buys it nothing);
  (b) B's p99 under the 8-run flood against B's solo p99 + 1.5 x the time of one full
      batch of A's (A alone, one operation on each of its 8 runs at once) (aim: below);
  (c) the share of tokens each tenant is served while both are backlogged (A 4 x 64-token
      operations on 8 runs, B 2 x 32-token operations on 8 runs) (aim: each >= 45 %).

Only B's calls that ended while A's flood was still pending count under a flood.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_bounds import SchedulerFlagsMesh, tiny_model  # noqa: E402
from train_throughput import BenchMesh, log, sdk_datums, token_rows, write_json  # noqa: E402

TINY = "tunemesh/tiny-dense"
A_SHAPE, B_SHAPE, B_FLOOD_SHAPE = (4, 64), (1, 32), (2, 32)  # rows x tokens per operation


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1e3, q)) if seconds else float("nan")


def token_shares(done_at: dict[str, list[float]], tokens_per_op: dict[str, int]) -> dict[str, float]:
    """Each tenant's share of the tokens served while every tenant was still backlogged:
    from when the last tenant's first operation ended to when the first tenant's last did."""
    start = max(min(times) for times in done_at.values())
    end = min(max(times) for times in done_at.values())
    served = {t: tokens_per_op[t] * sum(start <= x <= end for x in times) for t, times in done_at.items()}
    total = sum(served.values()) or 1
    return {t: served[t] / total for t in served}


class Tenant:
    """One tenant's client and runs."""

    def __init__(self, address: str, key: str, index: int, runs: int, vocab: int, shape: tuple[int, int]) -> None:
        import tunemesh

        self.client = tunemesh.ServiceClient(address, api_key=key)
        self.runs = [self.client.create_lora_training_client(TINY, rank=8, seed=i) for i in range(runs)]
        self.datums = sdk_datums(token_rows(vocab, shape[0], shape[1], seed=index))
        self.tokens = shape[0] * shape[1]

    def flood(self, ops: int, runs: int | None = None) -> list:
        """`ops` forward_backward calls spread round-robin over the first `runs` runs."""
        chosen = self.runs[:runs or len(self.runs)]
        return [chosen[i % len(chosen)].forward_backward(self.datums, "cross_entropy") for i in range(ops)]

    def close(self) -> None:
        self.client.close()


class Flood:
    """A's flood running in A's process: `done()` once every operation ended."""

    def __init__(self, conn) -> None:
        self._conn, self._done = conn, False

    def done(self) -> bool:
        if not self._done and self._conn.poll():
            self._done = self._conn.recv() == "done"
        return self._done

    def wait(self) -> None:
        while not self._done:
            self._done = self._conn.recv() == "done"


class RemoteTenant:
    """Tenant A in its own process, as a real tenant is: its SDK's work (building and
    submitting hundreds of calls) shares no interpreter with B's timing loop."""

    def __init__(self, address: str, key: str, vocab: int) -> None:
        import multiprocessing

        self._conn, child = multiprocessing.Pipe()
        context = multiprocessing.get_context("spawn")
        self._process = context.Process(target=_tenant_a, args=(child, address, key, vocab), daemon=True)
        self._process.start()
        self.tokens = self._conn.recv()  # ready: its runs exist

    def flood(self, ops: int, runs: int) -> Flood:
        self._conn.send(("flood", ops, runs))
        assert self._conn.recv() == "submitted"
        return Flood(self._conn)

    def full_batch_seconds(self, repeats: int) -> list[float]:
        self._conn.send(("batch", repeats))
        return self._conn.recv()

    def flood_stamped(self, ops_per_run: int) -> list[float]:
        """Start a flood on every run; returns a handle whose `.stamps()` are the
        monotonic times its operations ended."""
        self._conn.send(("stamped", ops_per_run))
        assert self._conn.recv() == "submitted"
        return self._conn

    def close(self) -> None:
        self._conn.send(("stop",))
        self._process.join(timeout=30)


def _tenant_a(conn, address: str, key: str, vocab: int) -> None:
    a = Tenant(address, key, 0, 8, vocab, A_SHAPE)
    conn.send(a.tokens)
    try:
        while (command := conn.recv())[0] != "stop":
            if command[0] == "flood":
                futures = a.flood(command[1], runs=command[2])
                conn.send("submitted")
                for future in futures:
                    future.result(timeout=600)
                conn.send("done")
            elif command[0] == "batch":
                conn.send(full_batch_seconds(a, command[1]))
            elif command[0] == "stamped":
                stamps: list[float] = []
                futures = a.flood(command[1] * len(a.runs))
                for future in futures:
                    future.add_done_callback(lambda _f: stamps.append(time.monotonic()))
                conn.send("submitted")
                for future in futures:
                    future.result(timeout=600)
                conn.send(stamps)
    finally:
        a.close()


def b_latencies(b: Tenant, calls: int, flood: Flood | None) -> list[float]:
    """B's sequential calls; under a flood, only those that ended while it was pending."""
    seconds = []
    for _ in range(calls):
        began = time.perf_counter()
        b.runs[0].forward_backward(b.datums, "cross_entropy").result(timeout=120)
        elapsed = time.perf_counter() - began
        if flood is not None and flood.done():
            break
        seconds.append(elapsed)
    if flood is not None:
        flood.wait()
    return seconds


def full_batch_seconds(a: Tenant, repeats: int) -> list[float]:
    """A alone: one operation on each of its runs at once (one fused batch), timed."""
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        for future in a.flood(len(a.runs)):
            future.result(timeout=120)
        seconds.append(time.perf_counter() - began)
    return seconds


def backlogged_shares(a: RemoteTenant, b_flood: Tenant, ops_per_run: int) -> dict[str, float]:
    """Both flood at once; the token shares while both were backlogged."""
    b_stamps: list[float] = []
    lock = threading.Lock()

    def stamp(_future) -> None:
        with lock:
            b_stamps.append(time.monotonic())

    a_conn = a.flood_stamped(ops_per_run)
    futures = b_flood.flood(ops_per_run * len(b_flood.runs))
    for future in futures:
        future.add_done_callback(stamp)
    for future in futures:
        future.result(timeout=600)
    a_stamps = a_conn.recv()
    return token_shares({"A": a_stamps, "B": b_stamps}, {"A": a.tokens, "B": b_flood.tokens})


def measure(mesh: BenchMesh, vocab: int, args: argparse.Namespace) -> dict:
    a = RemoteTenant(mesh.address, mesh.keys[0], vocab)
    b = Tenant(mesh.address, mesh.keys[1], 1, 1, vocab, B_SHAPE)
    b_flood = Tenant(mesh.address, mesh.keys[1], 1, 8, vocab, B_FLOOD_SHAPE)
    try:
        b_latencies(b, 5, None)  # warm up every path
        a.full_batch_seconds(2)
        rounds: dict[str, list[float]] = {"solo": [], "flood_1_run": [], "flood_8_runs": []}
        batch_s: list[float] = []
        for repeat in range(args.repeats):  # interleaved: load drift hits every case alike
            log(f"round {repeat + 1}/{args.repeats}")
            rounds["solo"] += b_latencies(b, args.b_calls, None)
            rounds["flood_1_run"] += b_latencies(b, args.b_calls, a.flood(args.flood_ops, runs=1))
            rounds["flood_8_runs"] += b_latencies(b, args.b_calls, a.flood(args.flood_ops, runs=8))
            batch_s += a.full_batch_seconds(3)
        shares = backlogged_shares(a, b_flood, args.share_ops_per_run)
    finally:
        for tenant in (a, b, b_flood):
            tenant.close()
    return summarize(rounds, batch_s, shares)


def summarize(rounds: dict[str, list[float]], batch_s: list[float], shares: dict[str, float]) -> dict:
    p50 = {k: percentile_ms(v, 50) for k, v in rounds.items()}
    p99 = {k: percentile_ms(v, 99) for k, v in rounds.items()}
    full_batch_ms = statistics.median(batch_s) * 1e3
    bound_ms = p99["solo"] + 1.5 * full_batch_ms
    return {
        "b_calls_counted": {k: len(v) for k, v in rounds.items()},
        "b_slowest_ms": {k: sorted((round(x * 1e3, 1) for x in v), reverse=True)[:5] for k, v in rounds.items()},
        "b_p50_ms": p50, "b_p99_ms": p99, "full_batch_ms_median": full_batch_ms,
        "a_runs_ratio": p50["flood_8_runs"] / p50["flood_1_run"],
        "b_p99_bound_ms": bound_ms, "b_p99_within_bound": p99["flood_8_runs"] <= bound_ms,
        "backlogged_token_share": shares,
        "aims": {"a_runs_ratio": "<= 1.2", "b_p99": "<= solo p99 + 1.5 x full batch", "share": ">= 0.45 each"},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--b-calls", type=int, default=30, help="B's calls per case and round")
    parser.add_argument("--flood-ops", type=int, default=400, help="A's operations per flood")
    parser.add_argument("--share-ops-per-run", type=int, default=40)
    parser.add_argument("--scheduler-flag", action="append", default=[],
                        help="a flag for the schedulers, e.g. --scheduler-flag=--durable=false (repeatable)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    data_dir, vocab = tiny_model()
    with tempfile.TemporaryDirectory(prefix="tunemesh-fairness-") as tmp:
        flags = tuple(part for flag in args.scheduler_flag for part in flag.split("=", 1))
        with SchedulerFlagsMesh(TINY, data_dir, Path(tmp) / "state", tenants=2, scheduler_flags=flags) as mesh:
            results = {"model": TINY, "load_average": os.getloadavg(), "scheduler_flags": flags,
                       **measure(mesh, vocab, args)}
    print(json.dumps(results, indent=2))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
