"""Fairness between tenants on one trainer: tenant A floods, tenant B sends small operations.

    python bench/fairness.py                       # tiny-dense, the figures below
    python bench/fairness.py --json bench/results/fairness.json

A mesh (etcd, scheduler, one trainer) runs on loopback through the launcher; A and B are
two tenants (two API keys). B sends one small forward_backward at a time (1 x 32 tokens)
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

    def __init__(self, mesh: BenchMesh, index: int, runs: int, vocab: int, shape: tuple[int, int]) -> None:
        import tunemesh

        self.client = tunemesh.ServiceClient(mesh.address, api_key=mesh.keys[index])
        self.runs = [self.client.create_lora_training_client(TINY, rank=8, seed=i) for i in range(runs)]
        self.datums = sdk_datums(token_rows(vocab, shape[0], shape[1], seed=index))
        self.tokens = shape[0] * shape[1]

    def flood(self, ops: int, runs: int | None = None) -> list:
        """`ops` forward_backward calls spread round-robin over the first `runs` runs."""
        chosen = self.runs[:runs or len(self.runs)]
        return [chosen[i % len(chosen)].forward_backward(self.datums, "cross_entropy") for i in range(ops)]

    def close(self) -> None:
        self.client.close()


def b_latencies(b: Tenant, calls: int, flood: list | None) -> list[float]:
    """B's sequential calls; under a flood, only those that ended while it was pending."""
    seconds = []
    for _ in range(calls):
        began = time.perf_counter()
        b.runs[0].forward_backward(b.datums, "cross_entropy").result(timeout=120)
        elapsed = time.perf_counter() - began
        if flood is not None and all(f.done() for f in flood):
            break
        seconds.append(elapsed)
    if flood is not None:
        for future in flood:
            future.result(timeout=600)
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


def backlogged_shares(a: Tenant, b_flood: Tenant, ops_per_run: int) -> dict[str, float]:
    done_at: dict[str, list[float]] = {"A": [], "B": []}
    lock = threading.Lock()

    def stamp(tenant: str):
        def record(_future) -> None:
            with lock:
                done_at[tenant].append(time.perf_counter())
        return record

    futures = []
    for tenant, who in (("A", a), ("B", b_flood)):
        for future in who.flood(ops_per_run * len(who.runs)):
            future.add_done_callback(stamp(tenant))
            futures.append(future)
    for future in futures:
        future.result(timeout=600)
    return token_shares(done_at, {"A": a.tokens, "B": b_flood.tokens})


def measure(mesh: BenchMesh, vocab: int, args: argparse.Namespace) -> dict:
    a = Tenant(mesh, 0, 8, vocab, A_SHAPE)
    b = Tenant(mesh, 1, 1, vocab, B_SHAPE)
    b_flood = Tenant(mesh, 1, 8, vocab, B_FLOOD_SHAPE)
    try:
        b_latencies(b, 5, None)  # warm up every path
        full_batch_seconds(a, 2)
        rounds: dict[str, list[float]] = {"solo": [], "flood_1_run": [], "flood_8_runs": []}
        batch_s: list[float] = []
        for repeat in range(args.repeats):  # interleaved: load drift hits every case alike
            log(f"round {repeat + 1}/{args.repeats}")
            rounds["solo"] += b_latencies(b, args.b_calls, None)
            rounds["flood_1_run"] += b_latencies(b, args.b_calls, a.flood(args.flood_ops, runs=1))
            rounds["flood_8_runs"] += b_latencies(b, args.b_calls, a.flood(args.flood_ops, runs=8))
            batch_s += full_batch_seconds(a, 3)
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
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from tunemesh_common.models import ModelRegistry

    with tempfile.TemporaryDirectory(prefix="tunemesh-fairness-") as tmp:
        data_dir = Path(os.environ.get("TUNEMESH_DATA_DIR", Path.home() / ".cache" / "tunemesh"))
        registry = ModelRegistry.default(data_dir)
        vocab = registry.entry(TINY).vocab_size
        registry.materialize(TINY)
        with BenchMesh(TINY, data_dir, Path(tmp) / "state", tenants=2) as mesh:
            results = {"model": TINY, "load_average": os.getloadavg(), **measure(mesh, vocab, args)}
    print(json.dumps(results, indent=2))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
