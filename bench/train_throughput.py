"""Training throughput of the mesh vs sequential HF PEFT loops, and control-plane overhead.

    python bench/train_throughput.py                    # tiny-dense and SmolLM2-135M
    python bench/train_throughput.py --quick            # tiny-dense, 1 and 2 tenants
    python bench/train_throughput.py --json bench/results/train_throughput.json

Per model: a mesh (etcd + one trainer + scheduler) is started through the launcher; N
tenants (distinct API keys) each run `steps` of forward_backward(B x T tokens) +
optim_step, pipelined. The mesh is then stopped and the same workload runs as N
sequential in-process PEFT loops. Throughput = tokens / wall seconds of measured steps.
Overhead: one 1 x 8-token forward_backward through the mesh vs the same item on an
in-process TorchTrainingEngine (p50, p95). See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import ModelShape, best_peaks, measure_peaks  # noqa: E402
from overhead_probes import (  # noqa: E402
    engine_probe, public_rpc_probe, run_probes, sdk_probe, trainer_rpc_probe,
)

TINY = "tunemesh/tiny-dense"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
ADAM = dict(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.0)
OVERHEAD_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class Workload:
    """What every tenant does: `warmup` + `steps` steps of B x T tokens each."""

    batch: int
    seq_len: int
    steps: int
    warmup: int
    rank: int
    depth: int = 2  # steps in flight per tenant (1 = wait at the end of every step)
    seed: int = 0

    def tokens(self, tenants: int) -> int:
        """Tokens trained in the measured steps of `tenants` tenants."""
        return tenants * self.batch * self.seq_len * self.steps


# pure helpers --------------------------------------------------------------------------


def token_rows(vocab_size: int, batch: int, seq_len: int, seed: int) -> np.ndarray:
    """(batch, seq_len + 1) random token ids: inputs are [:, :-1], targets [:, 1:]."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=(batch, seq_len + 1), dtype=np.int64)


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    """p50 / p95 of latencies given in seconds, in milliseconds."""
    p50, p95 = np.percentile(np.asarray(seconds) * 1e3, [50, 95])
    return {"p50_ms": round(float(p50), 3), "p95_ms": round(float(p95), 3)}


def throughput_row(workload: Workload, tenants: int, mesh_s: list[float], peft_s: list[float]) -> dict:
    """One table row from repeated measurements (medians): aggregate tokens/s and ratio."""
    tokens = workload.tokens(tenants)
    mesh_tps, peft_tps = tokens / float(np.median(mesh_s)), tokens / float(np.median(peft_s))
    return {
        "tenants": tenants, "tokens_per_repeat": tokens,
        "mesh_seconds": [round(x, 4) for x in mesh_s], "peft_seconds": [round(x, 4) for x in peft_s],
        "mesh_tokens_per_s": round(mesh_tps, 1), "peft_tokens_per_s": round(peft_tps, 1),
        "ratio": round(mesh_tps / peft_tps, 3),
    }


def overhead_summary(stages: dict[str, list[float]]) -> dict:
    """Percentiles per stage; overhead = SDK through the mesh - in-process engine; and the
    differences between successive stages (who adds what), all in ms."""
    ms = {name: percentiles_ms(seconds) for name, seconds in stages.items()}
    summary = {"calls": len(stages["sdk"]), "tokens": OVERHEAD_TOKENS, "stages": ms,
               "overhead_p50_ms": round(ms["sdk"]["p50_ms"] - ms["engine"]["p50_ms"], 3),
               "overhead_p95_ms": round(ms["sdk"]["p95_ms"] - ms["engine"]["p95_ms"], 3)}
    if {"public_rpc", "trainer_rpc", "trainer_engine"} <= ms.keys():
        p50 = {name: v["p50_ms"] for name, v in ms.items()}
        summary["breakdown_p50_ms"] = {
            "sdk_client (lanes, waiter threads, conversion)": round(p50["sdk"] - p50["public_rpc"], 3),
            "scheduler (auth, validation, queue, dispatch, long-poll)":
                round(p50["public_rpc"] - p50["trainer_rpc"], 3),
            "trainer rpc (gRPC, proto<->numpy, worker thread)": round(p50["trainer_rpc"] - p50["trainer_engine"], 3),
            "engine in trainer": p50["trainer_engine"],
        }
    return summary


def format_report(results: dict) -> str:
    """A readable table of every model's rows and the overhead figures."""
    lines = []
    for model in results["models"]:
        w = model["workload"]
        lines.append(f"\n{model['model']}  (B={w['batch']} T={w['seq_len']} steps={w['steps']} "
                     f"rank={w['rank']})")
        lines.append(f"{'tenants':>7} {'mesh tok/s':>11} {'PEFT tok/s':>11} {'ratio':>6} {'mesh MFU':>9} "
                     f"{'PEFT MFU':>9}")
        for row in model["rows"]:
            mfu = f"{row['mesh_mfu']:>9.1%} {row['peft_mfu']:>9.1%}" if "mesh_mfu" in row else ""
            lines.append(f"{row['tenants']:>7} {row['mesh_tokens_per_s']:>11.1f} "
                         f"{row['peft_tokens_per_s']:>11.1f} {row['ratio']:>6.2f} {mfu}")
    if results.get("machine"):
        m = results["machine"]
        lines.append(f"\nmachine ({m['threads']} threads): matmul fp32 {m['fp32_gflops']:.0f} GFLOP/s, "
                     f"bf16 {m['bf16_gflops']:.0f}; copy {m['copy_gb_s']:.1f} GB/s (MFU is of the fp32 peak)")
    if results.get("overhead"):
        o = results["overhead"]
        lines.append(f"\ncontrol-plane overhead, 1x{o['tokens']} forward_backward on {o['model']} "
                     f"({o['calls']} calls per stage, interleaved):")
        for name, v in o["stages"].items():
            lines.append(f"  {name:<15} p50 {v['p50_ms']:8.3f} ms  p95 {v['p95_ms']:8.3f} ms")
        lines.append(f"  overhead (sdk - engine) p50 {o['overhead_p50_ms']:.3f} ms  p95 {o['overhead_p95_ms']:.3f} ms")
        for name, value in o.get("breakdown_p50_ms", {}).items():
            lines.append(f"    p50 {value:8.3f} ms  {name}")
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_json(path: Path | None, results: dict) -> None:
    """Write a bench's figures (when --json was given)."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {path}")


# the mesh ------------------------------------------------------------------------------


class BenchMesh:
    """A local mesh for one model whose trainer uses the shared model cache `data_dir`."""

    def __init__(self, model: str, data_dir: Path, state_dir: Path, tenants: int, samplers: int = 0,
                 sampler_engine: str = "torch", sampler_dtype: str | None = None) -> None:
        self.model, self.data_dir, self.state_dir, self.samplers = model, data_dir, state_dir, samplers
        self.sampler_engine, self.sampler_dtype = sampler_engine, sampler_dtype
        self.keys = [f"bench-key-{i}" for i in range(tenants)]
        self.mesh = None
        self._saved_ca: str | None = None

    def __enter__(self) -> BenchMesh:
        from tunemesh_local import launcher

        self.state_dir.mkdir(parents=True, exist_ok=True)
        from tunemesh_common.service import api_keys

        keys_file = self.state_dir / "bench_api_keys.json"  # hashed; the keys stay in self.keys
        made = [api_keys.new_key(f"tenant-{i}") for i in range(len(self.keys))]
        self.keys = [key for key, _ in made]
        api_keys.write_key_file(keys_file, [record for _, record in made])
        config = launcher.MeshConfig(self.state_dir, trainers=1, models=(self.model,), api_keys_file=keys_file,
                                     samplers=self.samplers, sampler_engine=self.sampler_engine,
                                     sampler_dtype=self.sampler_dtype, ready_timeout=300.0)
        self.mesh = launcher.up(config, services=self._services)
        # TLS (the default): clients of this process and of those it starts trust the mesh CA.
        self._saved_ca = os.environ.get("TUNEMESH_CA_BUNDLE")
        if self.mesh.ca_file:
            os.environ["TUNEMESH_CA_BUNDLE"] = self.mesh.ca_file
        return self

    def __exit__(self, *exc_info: object) -> None:
        from tunemesh_local import launcher

        launcher.down(self.state_dir, grace=10.0)
        if self._saved_ca is None:
            os.environ.pop("TUNEMESH_CA_BUNDLE", None)
        else:
            os.environ["TUNEMESH_CA_BUNDLE"] = self._saved_ca

    @property
    def address(self) -> str:
        return self.mesh.scheduler_address

    @property
    def trainer_address(self) -> str:
        return self.mesh.by_role("trainer")[0].address

    def _services(self, config, etcd_endpoint: str, api_keys_file: Path) -> list:
        """The launcher's services, with trainers sharing one model cache (no reconversion)."""
        from tunemesh_local import launcher

        specs = launcher.default_services(config, etcd_endpoint, api_keys_file)
        return [dataclasses.replace(spec, argv=_with_data_dir(spec.argv, self.data_dir)) for spec in specs]


def _with_data_dir(argv: tuple[str, ...], data_dir: Path) -> tuple[str, ...]:
    args = list(argv)
    if "--data-dir" in args:
        args[args.index("--data-dir") + 1] = str(data_dir)
    return tuple(args)


def sdk_datums(rows: np.ndarray) -> list:
    """SDK datums for cross_entropy over `rows` (targets shifted by one, weights 1)."""
    import tunemesh

    return [tunemesh.Datum(model_input=tunemesh.ModelInput.from_ints(row[:-1].tolist()),
                           loss_fn_inputs={"target_tokens": row[1:], "weights": np.ones(len(row) - 1, np.float32)})
            for row in rows]


def tenant_steps(client, datums: list, steps: int, *, depth: int, adam=None) -> None:
    """`steps` of forward_backward + optim_step, keeping at most `depth` steps in flight
    (`adam`: the client SDK's AdamParams; tunemesh's with ADAM by default)."""
    import tunemesh

    adam, in_flight = adam or tunemesh.AdamParams(**ADAM), []
    for _ in range(steps):
        in_flight.append((client.forward_backward(datums, "cross_entropy"), client.optim_step(adam)))
        while len(in_flight) >= depth:
            for future in in_flight.pop(0):
                future.result()
    for pair in in_flight:
        for future in pair:
            future.result()


def timed_rounds(tenants: list[Callable[[int], None]], warmup: int, steps: int, repeats: int) -> list[float]:
    """Each tenant runs on its own thread: `tenant(warmup)`, then `repeats` rounds of
    `tenant(steps)` that all tenants start together; returns each round's wall seconds."""
    barrier, errors = threading.Barrier(len(tenants) + 1), []

    def tenant_thread(run: Callable[[int], None]) -> None:
        try:
            run(warmup)
            for _ in range(repeats):
                barrier.wait()
                run(steps)
                barrier.wait()
        except threading.BrokenBarrierError:
            pass
        except BaseException as err:  # noqa: BLE001 - re-raised by the main thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=tenant_thread, args=(run,), daemon=True) for run in tenants]
    for thread in threads:
        thread.start()
    seconds = []
    try:
        for _ in range(repeats):
            barrier.wait()
            began = time.perf_counter()
            barrier.wait()
            seconds.append(time.perf_counter() - began)
    except threading.BrokenBarrierError:
        pass
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return seconds


def mesh_seconds(mesh: BenchMesh, vocab_size: int, workload: Workload, tenants: int, repeats: int) -> list[float]:
    """Wall seconds per round of `tenants` concurrent tenants' measured steps, each on its own run."""
    import tunemesh

    services = [tunemesh.ServiceClient(mesh.address, api_key=mesh.keys[i]) for i in range(tenants)]
    try:
        runs = []
        for i, service in enumerate(services):
            client = service.create_lora_training_client(mesh.model, rank=workload.rank, seed=i)
            datums = sdk_datums(token_rows(vocab_size, workload.batch, workload.seq_len, workload.seed + i))
            runs.append(functools.partial(tenant_steps, client, datums, depth=workload.depth))
        return timed_rounds(runs, workload.warmup, workload.steps, repeats)
    finally:
        for service in services:
            service.close()


# control-plane overhead ------------------------------------------------------------------

def measure_overhead(mesh: BenchMesh, model_dir: Path, entry, calls: int, warmup: int) -> dict:
    """1 x 8-token forward_backward: SDK through the mesh vs in-process engine, plus stages."""
    import tunemesh
    from tunemesh import _wire

    row = token_rows(entry.vocab_size, 1, OVERHEAD_TOKENS, seed=99)
    datums = sdk_datums(row)
    protos = [_wire.datum_to_proto(d) for d in datums]
    with tunemesh.ServiceClient(mesh.address, api_key=mesh.keys[-1]) as service:
        sdk_client = service.create_lora_training_client(mesh.model, rank=8, seed=0)
        raw_run = service.create_lora_training_client(mesh.model, rank=8, seed=1).run
        probes = [sdk_probe(sdk_client, datums), engine_probe(model_dir, entry, row[0]),
                  public_rpc_probe(mesh.address, mesh.keys[-1], raw_run, protos),
                  trainer_rpc_probe(mesh.mesh, mesh.trainer_address, raw_run, protos)]
        stages = run_probes(probes, calls, warmup)
    return overhead_summary(stages)


def peft_seconds(base, vocab_size: int, workload: Workload, tenants: int, repeats: int) -> list[float]:
    """Seconds per round of `tenants` PEFT training loops run one after another: round r
    sums every tenant's r-th block of measured steps (after its warmup)."""
    import torch
    from peft import LoraConfig, get_peft_model

    rounds = [0.0] * repeats
    for i in range(tenants):
        torch.manual_seed(i)
        config = LoraConfig(r=workload.rank, lora_alpha=workload.rank, lora_dropout=0.0,
                            target_modules=list(LORA_TARGETS))
        model = get_peft_model(base, config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=ADAM["learning_rate"],
                                      betas=(ADAM["beta1"], ADAM["beta2"]), eps=ADAM["eps"], weight_decay=0.0)
        rows = torch.from_numpy(token_rows(vocab_size, workload.batch, workload.seq_len, workload.seed + i))
        _peft_steps(model, optimizer, rows, workload.warmup)
        for r in range(repeats):
            began = time.perf_counter()
            _peft_steps(model, optimizer, rows, workload.steps)
            rounds[r] += time.perf_counter() - began
        base = model.unload()  # the base model without this tenant's LoRA layers
    return rounds


def _peft_steps(model, optimizer, rows, steps: int) -> None:
    import torch

    inputs, targets = rows[:, :-1], rows[:, 1:]
    weights = torch.ones(targets.shape, dtype=torch.float32)
    for _ in range(steps):
        logits = model(input_ids=inputs).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        loss = -(weights * logprobs).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def load_base(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()  # like the trainer; the LoRA layers have no dropout either way


# orchestration ---------------------------------------------------------------------------


def bench_model(args: argparse.Namespace, name: str, state_root: Path) -> tuple[dict, dict | None]:
    """Mesh phase (every tenant count, then the overhead probes), mesh down, PEFT phase."""
    from tunemesh_common.models import ModelRegistry

    registry = ModelRegistry.default(args.data_dir)
    entry, model_dir = registry.entry(name), registry.materialize(name)
    workload, repeats = workload_for(args, name), args.repeats or (3 if name == TINY and not args.quick else 1)
    mesh_s, overhead, load = {}, None, [os.getloadavg()[0]]
    log(f"{name}: starting the mesh")
    with BenchMesh(name, args.data_dir, state_root / name.replace("/", "--"), max(args.tenants) + 1) as mesh:
        for n in args.tenants:
            mesh_s[n] = mesh_seconds(mesh, entry.vocab_size, workload, n, repeats)
            log(f"{name}: mesh, {n} tenants: {workload.tokens(n) / np.median(mesh_s[n]):.1f} tok/s")
        if args.overhead and name == TINY:
            overhead = {"model": name, **measure_overhead(mesh, model_dir, entry, args.overhead_calls,
                                                          args.overhead_warmup)}
            log(f"{name}: overhead p50 {overhead['overhead_p50_ms']} ms")
    log(f"{name}: mesh down; sequential PEFT loops")
    base, rows = load_base(model_dir), []
    for n in args.tenants:
        rows.append(throughput_row(workload, n, mesh_s[n], peft_seconds(base, entry.vocab_size, workload, n, repeats)))
        log(f"{name}: PEFT, {n} tenants: {rows[-1]['peft_tokens_per_s']:.1f} tok/s; ratio {rows[-1]['ratio']}")
    load.append(os.getloadavg()[0])
    result = {"model": name, "workload": dataclasses.asdict(workload), "repeats": repeats,
              "load_average_1m": load, "rows": rows}
    if args.peaks:
        args.peaks = best_peaks(args.peaks, measure_peaks())
        add_flop_utilisation(result, ModelShape.from_config(model_dir), args.peaks)
    return result, overhead


def add_flop_utilisation(result: dict, shape: ModelShape, peaks: dict) -> None:
    """Each row's model FLOP utilisation on both sides: the workload's training FLOPs per
    token (machine.ModelShape.training_flops) x tokens/s / the best fp32 matmul peak
    measured so far in this run (before the first model, after each)."""
    w = result["workload"]
    per_token = shape.training_flops(w["batch"], w["seq_len"], w["rank"]) / (w["batch"] * w["seq_len"])
    result["training_gflop_per_token"] = round(per_token / 1e9, 4)
    for row in result["rows"]:
        for side in ("mesh", "peft"):
            row[f"{side}_mfu"] = round(row[f"{side}_tokens_per_s"] * per_token / (peaks["fp32_gflops"] * 1e9), 4)


def workload_for(args: argparse.Namespace, name: str) -> Workload:
    """Defaults: tiny B=4 T=64, 20 steps after 3; others B=2 T=64, 3 steps after 1."""
    small = name == TINY
    return Workload(
        batch=args.batch or (4 if small else 2), seq_len=args.seq_len or 64,
        steps=args.steps or (3 if args.quick or not small else 20),
        warmup=args.warmup if args.warmup is not None else (1 if args.quick or not small else 3),
        rank=args.rank, depth=args.depth,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=f"{TINY},{SMOLLM2}", help="comma-separated registry names")
    p.add_argument("--tenants", default="1,2,4,8", help="comma-separated tenant counts")
    p.add_argument("--batch", type=int, default=0, help="datums per step (default 4 tiny, 2 otherwise)")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per datum (default 64)")
    p.add_argument("--steps", type=int, default=0, help="measured steps (default 20 tiny, 3 otherwise)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured steps first (default 3 tiny, 1)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--depth", type=int, default=2, help="steps in flight per mesh tenant")
    p.add_argument("--repeats", type=int, default=0, help="measured rounds, medians reported (default 3 tiny, 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads, bench and trainer (0: default)")
    p.add_argument("--overhead-calls", type=int, default=200)
    p.add_argument("--overhead-warmup", type=int, default=20)
    p.add_argument("--no-overhead", dest="overhead", action="store_false")
    p.add_argument("--no-mfu", dest="mfu", action="store_false", help="skip measuring the matmul peak")
    p.add_argument("--data-dir", type=Path, default=Path("~/.cache/tunemesh").expanduser(), help="model cache")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--quick", action="store_true", help="tiny-dense, 1 and 2 tenants, few steps")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.tenants = TINY, "1,2"
        args.overhead_calls, args.overhead_warmup = min(args.overhead_calls, 20), min(args.overhead_warmup, 3)
    args.models = [m for m in args.models.split(",") if m]
    args.tenants = [int(n) for n in args.tenants.split(",") if n]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["TUNEMESH_TRAINER_NUM_THREADS"] = str(args.threads)
    args.peaks = measure_peaks() if args.mfu else None
    results = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "models": [],
               "overhead": None, "machine": args.peaks}
    with tempfile.TemporaryDirectory(prefix="tunemesh-bench-") as state_root:
        for name in args.models:
            model_result, overhead = bench_model(args, name, Path(state_root))
            results["models"].append(model_result)
            results["overhead"] = overhead or results["overhead"]
    results["machine"] = args.peaks  # the best seen over the run (see add_flop_utilisation)
    print(format_report(results))
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
