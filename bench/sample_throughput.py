"""Multi-adapter sampling throughput of the mesh vs sequential HF PEFT `generate`, and
weight-sync latency.

    python bench/sample_throughput.py                     # SmolLM2-135M, 8 adapters x 8 prompts x 64 tokens
    python bench/sample_throughput.py --quick             # tiny-dense, 2 adapters x 2 prompts x 8 tokens
    python bench/sample_throughput.py --sampler-engine vllm
    python bench/sample_throughput.py --json bench/results/sample_throughput_smollm2.json

Mesh (etcd, checkpoint service, one trainer, one sampler, scheduler, via the launcher):
each of N tenants trains one run (rank r) for one step so its adapter differs from the
base, saves it for the sampler and downloads it; every tenant then submits its P greedy
requests (one random prompt each, `max_tokens` new tokens) at once, all N x P in flight
together; tokens/s = tokens returned / wall seconds of the round (one warmup round, then
`--repeats`, median). Weight sync: one run, `--sync-repeats` times: an untimed training
step, then the time from calling `save_weights_for_sampler` to holding the first token
sampled from a client made on the new checkpoint (p50, p95). After the mesh is down: the
same adapters (the downloaded files) through `PeftModel.from_pretrained` and one batched
`generate` of each adapter's P prompts, one adapter after another. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import ModelShape, best_peaks, measure_peaks, sampling_bound  # noqa: E402
from train_throughput import (  # noqa: E402
    SMOLLM2, TINY, BenchMesh, load_base, log, percentiles_ms, sdk_datums, token_rows, write_json,
)

TRAIN_LR = 1e-3  # one step at this rate moves B off zero enough to change some greedy tokens
# a round of 64 x 64 tokens on a busy 2-core CPU outlasts the SDK's 60 s per attempt; a retry
# would resubmit work the sampler is still doing, so each attempt may take its time
ATTEMPT_TIMEOUT_S = 1800.0


@dataclasses.dataclass(frozen=True)
class Workload:
    """`adapters` tenants, each sampling `prompts` prompts of `prompt_len` random tokens."""

    adapters: int
    prompts: int
    prompt_len: int
    new_tokens: int
    rank: int
    repeats: int
    sync_repeats: int


# pure helpers --------------------------------------------------------------------------


def prompt_tokens(vocab_size: int, workload: Workload, adapter: int) -> list[list[int]]:
    """The seeded random prompts of one adapter (seed = adapter index)."""
    rows = np.random.default_rng(adapter).integers(0, vocab_size, size=(workload.prompts, workload.prompt_len))
    return rows.tolist()


def trim_at_eos(rows: list[list[int]], eos_ids: frozenset[int]) -> list[list[int]]:
    """Each row up to and including its first end-of-sequence token: what the sampler
    returns for the same generation (it stops there and keeps the token)."""
    trimmed = []
    for row in rows:
        end = next((i + 1 for i, token in enumerate(row) if token in eos_ids), len(row))
        trimmed.append(list(row[:end]))
    return trimmed


def throughput_summary(mesh_rounds: list[tuple[float, int]], peft_rounds: list[tuple[float, int]]) -> dict:
    """Rounds of (seconds, tokens) on both sides; tokens/s of the median round and their ratio."""
    mesh_tps, peft_tps = _median_rate(mesh_rounds), _median_rate(peft_rounds)
    return {
        "mesh_seconds": [round(s, 4) for s, _ in mesh_rounds], "mesh_tokens": [t for _, t in mesh_rounds],
        "peft_seconds": [round(s, 4) for s, _ in peft_rounds], "peft_tokens": [t for _, t in peft_rounds],
        "mesh_tokens_per_s": round(mesh_tps, 1), "peft_tokens_per_s": round(peft_tps, 1),
        "ratio": round(mesh_tps / peft_tps, 3),
    }


def _median_rate(rounds: list[tuple[float, int]]) -> float:
    return float(np.median([tokens / seconds for seconds, tokens in rounds]))


def rows_agreeing(mesh: list[list[int]], peft: list[list[int]]) -> float:
    """Fraction of rows whose greedy tokens are identical on both sides."""
    if len(mesh) != len(peft) or not mesh:
        raise ValueError(f"row counts differ or are zero: {len(mesh)} vs {len(peft)}")
    return sum(a == b for a, b in zip(mesh, peft)) / len(mesh)


def format_report(result: dict) -> str:
    w, t, s = result["workload"], result["throughput"], result["weight_sync"]
    return "\n".join([
        f"{result['model']}, {w['adapters']} adapters x {w['prompts']} prompts x {w['new_tokens']} new tokens "
        f"(rank {w['rank']}, sampler engine {result['sampler_engine']} {result.get('sampler_dtype', 'float32')}, "
        f"median of {w['repeats']})",
        f"  mesh {t['mesh_tokens_per_s']:.1f} tok/s   sequential PEFT generate {t['peft_tokens_per_s']:.1f} tok/s"
        f"   ratio {t['ratio']:.2f}",
        f"  greedy rows equal on both sides: {result['greedy_rows_equal']:.3f}",
        *bound_lines(result),
        f"  weight sync (save_weights_for_sampler -> first sampled token, {s['calls']} calls): "
        f"p50 {s['p50_ms']:.1f} ms  p95 {s['p95_ms']:.1f} ms",
    ])


def bound_lines(result: dict) -> list[str]:
    """The machine's ceilings and the mesh's share of the round's roofline, if measured."""
    machine, bound = result.get("machine"), result.get("bound")
    if not machine or not bound:
        return []
    return [
        f"  machine ({machine['threads']} threads): matmul fp32 {machine['fp32_gflops']:.0f} GFLOP/s, "
        f"bf16 {machine['bf16_gflops']:.0f}; copy {machine['copy_gb_s']:.1f} GB/s",
        f"  roofline of the round {bound['tokens_per_s']:.0f} tok/s ({bound['compute_bound_steps']} of "
        f"{bound['steps']} decode steps compute-bound); mesh at {bound['mesh_fraction']:.1%} of it, "
        f"PEFT at {bound['peft_fraction']:.1%}",
    ]


def round_bound(model_dir: Path, workload: Workload, machine: dict, throughput: dict,
                dtype: str = "float32") -> dict:
    """The round's roofline at the measured peak of the sampler's `dtype` and the copy
    bandwidth, and each side's share (PEFT's against the same roofline)."""
    bf16 = dtype == "bfloat16"
    bound = sampling_bound(ModelShape.from_config(model_dir), workload.adapters * workload.prompts,
                           workload.prompt_len, workload.new_tokens, workload.rank,
                           machine["bf16_gflops" if bf16 else "fp32_gflops"], machine["copy_gb_s"],
                           bytes_per_weight=2 if bf16 else 4)
    bound["mesh_fraction"] = round(throughput["mesh_tokens_per_s"] / bound["tokens_per_s"], 4)
    bound["peft_fraction"] = round(throughput["peft_tokens_per_s"] / bound["tokens_per_s"], 4)
    return bound


# the mesh ------------------------------------------------------------------------------


@dataclasses.dataclass
class Tenant:
    """One tenant's adapter: its sampling client, prompts and downloaded PEFT files."""

    sampler: object
    prompts: list[list[int]]
    peft_dir: Path


def prepare_tenants(mesh: BenchMesh, services: list, vocab_size: int, workload: Workload,
                    download_root: Path) -> list[Tenant]:
    """Per tenant: a run, one training step, a sampler checkpoint, a client on it, its files."""
    import tunemesh

    tenants = []
    for i, service in enumerate(services):
        run = service.create_lora_training_client(mesh.model, rank=workload.rank, seed=i)
        run.forward_backward(sdk_datums(token_rows(vocab_size, 2, 32, seed=100 + i)), "cross_entropy")
        run.optim_step(tunemesh.AdamParams(learning_rate=TRAIN_LR)).result()
        path = run.save_weights_for_sampler(f"bench-{i}").result().path
        peft_dir = service.create_checkpoint_client().download(path, download_root / f"adapter-{i}")
        tenants.append(Tenant(service.create_sampling_client(model_path=path),
                              prompt_tokens(vocab_size, workload, i), peft_dir))
    return tenants


def mesh_round(tenants: list[Tenant], new_tokens: int) -> tuple[float, list[list[int]]]:
    """All tenants' requests submitted before any is awaited; (wall seconds, tokens per row)."""
    import tunemesh

    params = tunemesh.SamplingParams(max_tokens=new_tokens, temperature=0.0)
    began = time.perf_counter()
    futures = [t.sampler.sample(tunemesh.ModelInput.from_ints(p), 1, params) for t in tenants for p in t.prompts]
    rows = [future.result().sequences[0].tokens for future in futures]
    return time.perf_counter() - began, rows


def weight_sync_seconds(service, model: str, vocab_size: int, workload: Workload) -> list[float]:
    """Per repeat: an untimed training step, then save_weights_for_sampler -> first token."""
    import tunemesh

    run = service.create_lora_training_client(model, rank=workload.rank, seed=99)
    datums = sdk_datums(token_rows(vocab_size, 2, 32, seed=99))
    prompt = tunemesh.ModelInput.from_ints(prompt_tokens(vocab_size, workload, 99)[0])
    first_token = tunemesh.SamplingParams(max_tokens=1, temperature=0.0)
    seconds = []
    for i in range(workload.sync_repeats):
        run.forward_backward(datums, "cross_entropy")
        run.optim_step(tunemesh.AdamParams(learning_rate=TRAIN_LR)).result()
        began = time.perf_counter()
        path = run.save_weights_for_sampler(f"sync-{i}").result().path
        client = service.create_sampling_client(model_path=path)
        tokens = client.sample(prompt, 1, first_token).result().sequences[0].tokens
        seconds.append(time.perf_counter() - began)
        if len(tokens) != 1:
            raise RuntimeError(f"expected one sampled token, got {tokens}")
    return seconds


def mesh_phase(args: argparse.Namespace, entry, workload: Workload, root: Path) -> tuple[dict, list[Tenant]]:
    """Warmup + measured rounds, then weight sync; the mesh is down on return."""
    rounds, rows = [], []
    with BenchMesh(args.model, args.data_dir, root / "mesh", workload.adapters, samplers=1,
                   sampler_engine=args.sampler_engine, sampler_dtype=args.sampler_dtype) as mesh, \
            contextlib.ExitStack() as stack:
        import tunemesh

        patient = tunemesh.RetryPolicy(attempt_timeout_s=ATTEMPT_TIMEOUT_S, total_timeout_s=ATTEMPT_TIMEOUT_S)
        services = [stack.enter_context(tunemesh.ServiceClient(mesh.address, key, retry_policy=patient))
                    for key in mesh.keys]
        tenants = prepare_tenants(mesh, services, entry.vocab_size, workload, root / "adapters")
        log(f"mesh: {len(tenants)} adapters ready; warmup round")
        mesh_round(tenants, workload.new_tokens)
        for _ in range(workload.repeats):
            seconds, rows = mesh_round(tenants, workload.new_tokens)
            rounds.append((seconds, sum(map(len, rows))))
            log(f"mesh: {rounds[-1][1]} tokens in {seconds:.2f} s = {rounds[-1][1] / seconds:.1f} tok/s")
        sync = weight_sync_seconds(services[0], args.model, entry.vocab_size, workload)
        log(f"mesh: weight sync {percentiles_ms(sync)}")
    return {"rounds": rounds, "rows": rows, "sync": sync}, tenants


# the baseline ----------------------------------------------------------------------------


def eos_token_ids(model) -> frozenset[int]:
    """End-of-sequence ids of the model's generation config and config, as the sampler reads them."""
    found: set[int] = set()
    for source in (model.generation_config, model.config):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            found.update([value] if isinstance(value, int) else value)
    return frozenset(int(v) for v in found)


def peft_rounds(base, tenants: list[Tenant], workload: Workload) -> tuple[list[tuple[float, int]], list[list[int]]]:
    """Round r sums each adapter's r-th batched `generate` (after one warmup call each)."""
    import torch
    from peft import PeftModel

    eos = eos_token_ids(base)
    seconds, tokens, rows = [0.0] * workload.repeats, [0] * workload.repeats, []
    for tenant in tenants:
        model = PeftModel.from_pretrained(base, tenant.peft_dir).eval()
        ids = torch.tensor(tenant.prompts)
        generate = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=workload.new_tokens,
                        do_sample=False, eos_token_id=sorted(eos), pad_token_id=min(eos, default=0))
        with torch.no_grad():
            model.generate(**generate)
            for r in range(workload.repeats):
                began = time.perf_counter()
                out = model.generate(**generate)
                seconds[r] += time.perf_counter() - began
                new = trim_at_eos(out[:, ids.shape[1]:].tolist(), eos)
                tokens[r] += sum(map(len, new))
        rows += new
        log(f"PEFT: adapter {len(rows) // len(new)} of {len(tenants)}: {sum(seconds):.1f} s so far")
        base = model.unload()  # the base without this adapter's LoRA layers
    return list(zip(seconds, tokens)), rows


# orchestration ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=SMOLLM2, help="registry name (default SmolLM2-135M-Instruct)")
    p.add_argument("--adapters", type=int, default=8, help="tenants, one adapter each")
    p.add_argument("--prompts", type=int, default=8, help="prompts per adapter")
    p.add_argument("--prompt-len", type=int, default=32, help="random tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="max_tokens / max_new_tokens")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--repeats", type=int, default=3, help="measured rounds after one warmup (median reported)")
    p.add_argument("--sync-repeats", type=int, default=10, help="weight-sync measurements")
    p.add_argument("--sampler-engine", default="torch", choices=("torch", "vllm", "auto"))
    p.add_argument("--sampler-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the sampler's base dtype (PEFT stays float32; the roofline uses the matching peak)")
    p.add_argument("--data-dir", type=Path, default=Path("~/.cache/tunemesh").expanduser(), help="model cache")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--quick", action="store_true", help="tiny-dense, 2 adapters x 2 prompts x 8 tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.adapters, args.prompts, args.new_tokens = TINY, 2, 2, 8
        args.repeats, args.sync_repeats = 1, 3
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
    from tunemesh_common.models import ModelRegistry

    registry = ModelRegistry.default(args.data_dir)
    entry, model_dir = registry.entry(args.model), registry.materialize(args.model)
    workload = Workload(args.adapters, args.prompts, args.prompt_len, args.new_tokens, args.rank, args.repeats,
                        args.sync_repeats)
    load = [os.getloadavg()[0]]
    machine = measure_peaks()
    log(f"machine: {machine}")
    with tempfile.TemporaryDirectory(prefix="tunemesh-bench-sample-") as root:
        mesh, tenants = mesh_phase(args, entry, workload, Path(root))
        load.append(os.getloadavg()[0])
        log("mesh down; sequential PEFT generate")
        peft, peft_rows = peft_rounds(load_base(model_dir), tenants, workload)
    load.append(os.getloadavg()[0])
    machine = best_peaks(machine, measure_peaks())
    throughput = throughput_summary(mesh["rounds"], peft)
    result = {
        "model": args.model, "sampler_engine": args.sampler_engine, "workload": dataclasses.asdict(workload),
        "cpu_count": os.cpu_count(), "load_average_1m": load, "machine": machine,
        "sampler_dtype": args.sampler_dtype,
        "bound": round_bound(model_dir, workload, machine, throughput, args.sampler_dtype),
        "throughput": throughput,
        "greedy_rows_equal": round(rows_agreeing(mesh["rows"], peft_rows), 3),
        "weight_sync": {"calls": len(mesh["sync"]), **percentiles_ms(mesh["sync"]),
                        "seconds": [round(s, 4) for s in mesh["sync"]]},
    }
    print(format_report(result))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
