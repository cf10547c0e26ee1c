"""Where the price of durability goes: CPU by process, etcd transactions, and how often
the trainer's engine thread lost its core, one fresh price mesh per mode.

    python bench/price_probe.py --modes on,off,on,off --threads 1
    python bench/price_probe.py --model HuggingFaceTB/SmolLM2-135M-Instruct --modes on,off --rounds 2 \
        --json bench/results/price_probe_smollm2.json

The meshes and workload are `recovery.py --parts price`'s (8 tenants on one trainer).
Around the measured rounds (run creation and warmup included) it reads, per mode:

- CPU seconds of each mesh process (`/proc/PID/stat`, utime + stime) and of the bench
  process, which runs the tenants' SDK threads;
- etcd's own counters (`/metrics` on its plaintext metrics listener): transactions, keys
  put and deleted, WAL fsyncs;
- the trainer's busiest thread (the engine thread: it runs every fused pass) — CPU
  seconds, system seconds, and voluntary and involuntary context switches
  (`/proc/PID/task/TID/status`). Involuntary switches count how often another thread
  took its core; voluntary ones, how often it waited (a lock, the GIL, work).

Linux only. See bench/README.md ("The price taken apart").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recovery  # noqa: E402
from train_throughput import TINY, log, mesh_seconds, write_json  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BATCH_COUNTERS = ("tunemesh_scheduler_batch_items_count", "tunemesh_scheduler_batch_items_sum")
ETCD_COUNTERS = ("etcd_mvcc_txn_total", "etcd_mvcc_put_total", "etcd_mvcc_delete_total",
                 "etcd_disk_wal_fsync_duration_seconds_count")


def cpu_seconds(stat_path: str) -> tuple[float, float]:
    """(utime + stime, stime) in seconds from a /proc .../stat file."""
    fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def threads(pid: int) -> dict[int, dict[str, float]]:
    """Per thread of `pid`: cpu and sys seconds, voluntary and involuntary switches."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            cpu, system = cpu_seconds(f"/proc/{pid}/task/{tid}/stat")
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        switches = {key: int(value) for key, value in re.findall(r"^(\w*voluntary_ctxt_switches):\s+(\d+)", status, re.M)}
        found[int(tid)] = {"cpu_s": cpu, "sys_s": system, "voluntary": switches["voluntary_ctxt_switches"],
                           "involuntary": switches["nonvoluntary_ctxt_switches"]}
    return found


def etcd_counters(metrics_address: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    return {name: float(m.group(1)) for name in ETCD_COUNTERS
            if (m := re.search(rf"^{name} (\S+)$", text, re.M))}


def batch_counters(schedulers: list) -> dict[str, float]:
    """Fused batches and their operations, summed over the scheduler replicas (the leader
    sends them all)."""
    found = dict.fromkeys(BATCH_COUNTERS, 0.0)
    for record in schedulers:
        text = urllib.request.urlopen(record.metrics_url, timeout=10).read().decode()
        for name in BATCH_COUNTERS:
            found[name] += sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))
    return found


def delta(after: dict, before: dict) -> dict:
    return {key: round(value - before.get(key, 0), 3) for key, value in after.items()}


def probe(args: argparse.Namespace, vocab_size: int, mode: str, state_dir: Path) -> dict:
    from tunemesh_common.membership.etcd_process import health_endpoint
    from tunemesh_local import state

    workload = recovery.price_workload(args)
    with recovery.Mesh(args.model, args.data_dir, state_dir, trainers=1, tenants=args.tenants,
                       env=recovery.PRICE_MODES[mode]) as mesh:
        processes = {p.name: p for p in state.load(state_dir).processes}
        etcd = health_endpoint(processes["etcd"].argv)
        trainer = processes["trainer-0"].pid
        cpu0 = {name: cpu_seconds(f"/proc/{p.pid}/stat")[0] for name, p in processes.items()}
        schedulers = [p for p in processes.values() if p.role == "scheduler" and p.metrics_url]
        bench0, etcd0, threads0 = sum(os.times()[:2]), etcd_counters(etcd), threads(trainer)
        batches0 = batch_counters(schedulers)
        started = time.monotonic()
        seconds = mesh_seconds(mesh, vocab_size, workload, args.tenants, args.rounds)
        wall = time.monotonic() - started
        cpu = {name: cpu_seconds(f"/proc/{p.pid}/stat")[0] - cpu0[name] for name, p in processes.items()}
        bench, etcd_after, threads1 = sum(os.times()[:2]) - bench0, etcd_counters(etcd), threads(trainer)
        batches = delta(batch_counters(schedulers), batches0)
        snapshots = sum(m.startswith("snapshot of ") for _, m in recovery.log_entries(mesh.log_text("scheduler")))
    engine_tid = max(threads1, key=lambda tid: threads1[tid]["cpu_s"] - threads0.get(tid, {}).get("cpu_s", 0))
    return {"mode": mode, "seconds": [round(s, 3) for s in seconds], "wall_s": round(wall, 1),
            "tokens_per_s": round(workload.tokens(args.tenants) / sorted(seconds)[len(seconds) // 2], 1),
            "snapshots": snapshots, "cpu_s": {name: round(value, 2) for name, value in cpu.items()},
            "bench_process_cpu_s": round(bench, 2), "etcd": delta(etcd_after, etcd0), "batches": batches,
            "engine_thread": delta(threads1[engine_tid], threads0.get(engine_tid, {})),
            "load_average_1m": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=TINY)
    p.add_argument("--modes", default="on,off,off,on", help=f"comma-separated, of {sorted(recovery.PRICE_MODES)}")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per mesh")
    p.add_argument("--threads", type=int, default=1, help="trainer torch threads")
    p.add_argument("--tenants", type=int, default=8)
    p.add_argument("--data-dir", type=Path, default=Path("~/.cache/tunemesh").expanduser(), help="model cache")
    p.add_argument("--state-dir", type=Path, default=None, help="keep the meshes' logs here")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.batch = args.seq_len = args.steps = 0
    args.warmup, args.rank, args.depth = None, 16, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
    os.environ["TUNEMESH_TRAINER_NUM_THREADS"] = str(args.threads)
    from tunemesh_common.models import ModelRegistry

    registry = ModelRegistry.default(args.data_dir)
    vocab_size = registry.entry(args.model).vocab_size
    registry.materialize(args.model)
    import tempfile

    results = []
    with tempfile.TemporaryDirectory(prefix="tunemesh-price-probe-") as scratch:
        root = args.state_dir or Path(scratch)
        for i, mode in enumerate(args.modes.split(",")):
            results.append(probe(args, vocab_size, mode, root / f"{i}-{mode}"))
            log(json.dumps(results[-1]))
    write_json(args.json, {"model": args.model, "code": recovery.code_version(), "cpu_count": os.cpu_count(),
                           "trainer_threads": args.threads, "meshes": results})
    return results


if __name__ == "__main__":
    main()
