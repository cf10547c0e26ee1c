"""A training step alone and with CPU-bound neighbours on the same cores (issue 16, item 6).

    python bench/contention.py                                  # tiny-dense, 8 x 64 tokens
    python bench/contention.py --json bench/results/contention.json
    python bench/contention.py --trainer-env OMP_WAIT_POLICY=ACTIVE   # compare a setting

A mesh on loopback (etcd, scheduler, one trainer with the launcher's thread count); one
tenant runs forward_backward + optim_step on `--batch` x `--seq-len` tokens, one step at a
time, and times each. Phases, in one run: alone; with `--neighbours` processes that each
busy-loop one core (plain Python, like a neighbour's job); alone again. The figure is the
median step with neighbours / the median step alone (aim <= 2.5 on 2 cores).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import TINY, BenchMesh, log, sdk_datums, token_rows, write_json  # noqa: E402


def _spin(stop) -> None:
    while not stop.is_set():
        for _ in range(100_000):
            pass


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def step_seconds(trainer, datums, steps: int) -> list[float]:
    import tunemesh

    seconds = []
    for _ in range(steps):
        began = time.perf_counter()
        trainer.forward_backward(datums, "cross_entropy")
        trainer.optim_step(tunemesh.AdamParams(learning_rate=1e-4)).result(timeout=600)
        seconds.append(time.perf_counter() - began)
    return seconds


def measure(mesh: BenchMesh, vocab: int, args: argparse.Namespace) -> dict:
    import tunemesh

    with tunemesh.ServiceClient(mesh.address, api_key=mesh.keys[0]) as service:
        trainer = service.create_lora_training_client(mesh.model, rank=16, seed=0)
        datums = sdk_datums(token_rows(vocab, args.batch, args.seq_len, seed=0))
        step_seconds(trainer, datums, args.warmup)
        alone = step_seconds(trainer, datums, args.steps)
        log(f"alone: median {statistics.median(alone) * 1000:.1f} ms")
        context = multiprocessing.get_context("spawn")
        stop = context.Event()
        spinners = [context.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.neighbours)]
        for spinner in spinners:
            spinner.start()
        try:
            time.sleep(1.0)
            cpu_before, wall_before = sum(_cpu_s(p.pid) for p in spinners), time.perf_counter()
            crowded = step_seconds(trainer, datums, args.steps)
            neighbour_cores = (sum(_cpu_s(p.pid) for p in spinners) - cpu_before) / (time.perf_counter() - wall_before)
        finally:
            stop.set()
            for spinner in spinners:
                spinner.join(timeout=10)
        log(f"with {args.neighbours} busy neighbour(s): median {statistics.median(crowded) * 1000:.1f} ms "
            f"(the neighbours used {neighbour_cores:.2f} cores meanwhile)")
        again = step_seconds(trainer, datums, args.steps)
    ratio = statistics.median(crowded) / statistics.median(alone + again)
    return {"alone_ms": [round(s * 1e3, 1) for s in alone], "crowded_ms": [round(s * 1e3, 1) for s in crowded],
            "alone_again_ms": [round(s * 1e3, 1) for s in again],
            "alone_median_ms": round(statistics.median(alone + again) * 1e3, 1),
            "crowded_median_ms": round(statistics.median(crowded) * 1e3, 1),
            "neighbour_cores_used": round(neighbour_cores, 2),
            "ratio_crowded_alone": round(ratio, 2), "aim": "<= 2.5", "met": ratio <= 2.5}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=TINY)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--neighbours", type=int, default=2, help="busy-looping processes (one core each)")
    parser.add_argument("--trainer-env", action="append", default=[], metavar="NAME=VALUE",
                        help="set in the trainer's environment (e.g. to compare a thread setting)")
    parser.add_argument("--data-dir", type=Path, default=Path("~/.cache/tunemesh").expanduser())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
    for pair in args.trainer_env:
        name, _, value = pair.partition("=")
        os.environ[name] = value  # the launcher's children inherit it
    from tunemesh_common.models import ModelRegistry

    vocab = ModelRegistry.default(args.data_dir).entry(args.model).vocab_size
    result = {"model": args.model, "cpu_count": os.cpu_count(), "batch": args.batch, "seq_len": args.seq_len,
              "neighbours": args.neighbours, "trainer_env": args.trainer_env,
              "load_average_1m": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="tunemesh-contention-") as state, \
            BenchMesh(args.model, args.data_dir, Path(state), tenants=1) as mesh:
        result.update(measure(mesh, vocab, args))
    print(f"step with {args.neighbours} busy neighbour(s) / alone: {result['ratio_crowded_alone']} (aim <= 2.5)")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
