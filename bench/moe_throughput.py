"""MoE training throughput: fused grouped expert LoRA vs sequential PEFT, and 1 vs 2 DeepSpeed ranks.

    python bench/moe_throughput.py                          # 8 tenants x 4 rows x 256 tokens, ranks 1,2
    python bench/moe_throughput.py --tenants 2 --repeats 1 --rows 1 --seq-len 16 --ranks ''
    python bench/moe_throughput.py --json bench/results/moe_throughput.json

Every tenant trains its own LoRA (attention + per-expert LoRA on the fused expert weights)
on `tunemesh/tiny-moe`, starting from the same random factors on every side, with the
same rows. One step = forward_backward of every tenant's rows + every tenant's AdamW step.
Sides, in process and interleaved round by round so that load drift hits them alike:
the fused torch engine (all tenants in one batch; at torch's default thread count and at
1 thread) and sequential HF PEFT (`target_modules` on attention, `target_parameters` on
the experts; one tenant after another). Then, each in a child process (a process leads
one DeepSpeed group only): the DeepSpeed engine on W local CPU ranks (gloo), all tenants
in one batch, rows split across ranks. Tokens/s = tenants x rows x seq_len x steps /
median seconds of a round. Before timing counts, the first step's per-tenant losses of
the fused engine and of PEFT must agree within rel 1e-4. See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

MODEL = "tunemesh/tiny-moe"
RTOL = 1e-4
DELTA_RTOL = 1e-2
B_SCALE = 0.5  # random B factors: LoRA (experts included) moves every loss from the start
ADAM = dict(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.0)


@dataclasses.dataclass(frozen=True)
class Workload:
    """Every tenant: `rows` datums of `seq_len` tokens per step; `warmup` untimed steps,
    then `repeats` timed rounds of `steps` steps."""

    tenants: int = 8
    rows: int = 4
    seq_len: int = 256
    rank: int = 16
    steps: int = 1
    warmup: int = 1
    repeats: int = 5
    seed: int = 0

    def tokens_per_round(self) -> int:
        return self.tenants * self.rows * self.seq_len * self.steps


# pure helpers --------------------------------------------------------------------------


def rel_err(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-30)


def side_figures(workload: Workload, threads: str, seconds: list[float]) -> dict:
    """One side's row: every round's seconds and tokens/s of the median round."""
    return {"threads": threads, "seconds": [round(s, 4) for s in seconds],
            "tokens_per_s": round(workload.tokens_per_round() / float(np.median(seconds)), 1)}


RATIOS = [("fused", "peft_sequential"), ("fused", "fused_1_thread"), ("deepspeed_2_ranks", "deepspeed_1_rank"),
          ("deepspeed_2_ranks_ep2", "deepspeed_2_ranks"),
          ("deepspeed_2_ranks", "fused"), ("deepspeed_1_rank", "fused_1_thread")]


def ratios(sides: dict[str, dict]) -> dict[str, float]:
    """Throughput ratios `a / b` of the RATIOS pairs whose sides were both measured."""
    tps = {name: side["tokens_per_s"] for name, side in sides.items()}
    return {f"{a} / {b}": round(tps[a] / tps[b], 3) for a, b in RATIOS if a in tps and b in tps}


def correctness(fused: list[list[float]], peft: list[list[float]], base: list[float]) -> dict:
    """Per-tenant losses of every step, fused vs PEFT. The first step's losses must agree
    within RTOL, and so must, within DELTA_RTOL, what LoRA adds to them (loss - the base
    model's loss): a random tiny model's loss moves little, so the second is the sharper test."""
    first = [rel_err(f[0], p[0]) for f, p in zip(fused, peft, strict=True)]
    delta = [rel_err(f[0] - b, p[0] - b) for f, p, b in zip(fused, peft, base, strict=True)]
    steps = [rel_err(a, b) for f, p in zip(fused, peft) for a, b in zip(f, p)]
    return {"rtol": RTOL, "delta_rtol": DELTA_RTOL, "ok": max(first) <= RTOL and max(delta) <= DELTA_RTOL,
            "max_rel_err_first_step": max(first), "max_rel_err_lora_delta": max(delta),
            "max_rel_err_all_steps": max(steps),
            "min_lora_effect_rel": min(rel_err(p[0], b) for p, b in zip(peft, base))}


def format_report(results: dict) -> str:
    w = results["workload"]
    lines = [f"{results['model']}: {w['tenants']} tenants x {w['rows']} rows x {w['seq_len']} tokens, "
             f"LoRA rank {w['rank']} (attention + experts), {w['steps']} step(s) per round, "
             f"{w['repeats']} rounds after {w['warmup']} warmup; {results['cpu_count']} CPUs",
             f"{'side':<22} {'threads':>8} {'s/round (median)':>17} {'tokens/s':>10}"]
    for name, side in results["sides"].items():
        lines.append(f"{name:<22} {side['threads']:>8} {float(np.median(side['seconds'])):>17.3f} "
                     f"{side['tokens_per_s']:>10.1f}")
    lines += [f"  {label}: {value:.2f}" for label, value in results["ratios"].items()]
    c = results["correctness"]
    lines.append(f"correctness ({'ok' if c['ok'] else 'FAILED'}), first step, fused vs PEFT: loss max rel err "
                 f"{c['max_rel_err_first_step']:.1e} (<= {c['rtol']:g}); LoRA's share of the loss (>= "
                 f"{c['min_lora_effect_rel']:.1e} of it) max rel err {c['max_rel_err_lora_delta']:.1e} "
                 f"(<= {c['delta_rtol']:g}); every step's loss max rel err {c['max_rel_err_all_steps']:.1e}")
    for name, err in results.get("deepspeed_vs_torch_max_rel_err", {}).items():
        lines.append(f"  {name} vs torch engine, losses of every step: max rel err {err:.1e}")
    lines += [f"note: {note}" for note in results.get("notes", [])]
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# the workload --------------------------------------------------------------------------


def lora_spec(workload: Workload, tenant: int):
    from tunemesh_trainer.domain import LoraSpec

    return LoraSpec(rank=workload.rank, alpha=float(workload.rank), train_attn=True, train_mlp=False,
                    train_unembed=False, train_experts=True, seed=tenant + 1)


def tenant_rows(workload: Workload, vocab_size: int, tenant: int) -> list:
    """The tenant's datums: random tokens and targets, weights 1 (the same every step)."""
    from tunemesh_trainer.domain import DatumArrays

    rng = np.random.default_rng((workload.seed, tenant))
    shape = (workload.rows, workload.seq_len)
    tokens, targets = rng.integers(0, vocab_size, shape), rng.integers(0, vocab_size, shape)
    return [DatumArrays(tokens[i], {"target_tokens": targets[i], "weights": np.ones(shape[1], np.float32)})
            for i in range(workload.rows)]


def start_states(engine, workload: Workload) -> list:
    """Create every tenant's adapter on `engine` with seeded random B factors; their states."""
    from tunemesh_trainer.domain import AdapterState

    states = []
    for tenant in range(workload.tenants):
        spec = lora_spec(workload, tenant)
        engine.create_adapter(f"t{tenant}", spec)
        weights = engine.export_adapter(f"t{tenant}", with_optimizer=False).weights
        rng = np.random.default_rng((workload.seed, tenant, 1))
        for name, array in weights.items():
            if ".lora_B." in name:
                weights[name] = (rng.standard_normal(array.shape) * B_SCALE).astype(np.float32)
        states.append(AdapterState(spec, weights))
        engine.import_adapter(f"t{tenant}", states[-1])
    return states


# sides: each `step()` trains every tenant once and returns their losses -----------------


class EngineSide:
    """A TrainingEngine (torch or DeepSpeed group): one fused batch of all tenants, then
    every tenant's optimizer step."""

    def __init__(self, engine, workload: Workload, vocab_size: int, threads: int) -> None:
        from tunemesh_trainer.domain import AdamSpec, EngineItem, ItemKind

        self.threads, self._engine, self._adam = threads, engine, AdamSpec(**ADAM)
        self.states = start_states(engine, workload)
        self._items = [EngineItem(f"i{t}", f"t{t}", ItemKind.FORWARD_BACKWARD, tenant_rows(workload, vocab_size, t))
                       for t in range(workload.tenants)]

    def step(self) -> list[float]:
        outcomes = self._engine.run_batch(self._items)
        failed = [o.failure for o in outcomes if o.failure is not None]
        if failed:
            raise RuntimeError(f"engine failed an item: {failed[0]}")
        for item in self._items:
            self._engine.optim_step(item.adapter_id, self._adam)
        return [float(o.metrics["loss:sum"]) for o in outcomes]


class PeftSide:
    """One HF PEFT model per tenant loaded from its start state written as a tunemesh
    checkpoint (a PEFT adapter directory); tenants train one after another."""

    def __init__(self, model_dir: Path, states: list, workload: Workload, vocab_size: int, threads: int) -> None:
        import torch

        self.threads, self._tenants = threads, []
        with tempfile.TemporaryDirectory(prefix="tunemesh-moe-bench-") as tmp:
            for tenant, state in enumerate(states):
                model = load_peft(model_dir, state, Path(tmp) / f"t{tenant}")
                params = [p for p in model.parameters() if p.requires_grad]
                optimizer = torch.optim.AdamW(params, lr=ADAM["learning_rate"], betas=(ADAM["beta1"], ADAM["beta2"]),
                                              eps=ADAM["eps"], weight_decay=ADAM["weight_decay"], foreach=True)
                rows = tenant_rows(workload, vocab_size, tenant)
                inputs = torch.as_tensor(np.stack([d.tokens for d in rows]))
                targets = torch.as_tensor(np.stack([d.loss_inputs["target_tokens"] for d in rows]))
                self._tenants.append((model, optimizer, inputs, targets))
        self.base_losses = self._base_losses()

    def step(self) -> list[float]:
        losses = []
        for model, optimizer, inputs, targets in self._tenants:
            loss = _peft_loss(model, inputs, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return losses

    def _base_losses(self) -> list[float]:
        """Each tenant's loss on the base model alone (its LoRA disabled)."""
        import torch

        with torch.no_grad():
            losses = []
            for model, _, inputs, targets in self._tenants:
                with model.disable_adapter():
                    losses.append(float(_peft_loss(model, inputs, targets)))
            return losses


def load_peft(model_dir: Path, state, directory: Path):
    """`state` written as a tunemesh checkpoint, loaded trainable by PEFT on a fresh base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunemesh_trainer import checkpoint_files

    directory.mkdir(parents=True)
    for name, parts in checkpoint_files.encode(state, MODEL).items():
        (directory / name).write_bytes(b"".join(parts))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(base, directory, is_trainable=True).eval()  # eval like the trainer


def _peft_loss(model, inputs, targets):
    """The engine's cross_entropy with weights 1: -sum(logprob[target])."""
    import torch

    logits = model(input_ids=inputs, use_cache=False).logits
    return -torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).sum()


def measure(sides: dict[str, object], workload: Workload) -> tuple[dict[str, list[float]], dict[str, list]]:
    """Warmup, then `repeats` rounds, each timing every side's `steps` steps in turn.
    Returns seconds per round and every step's per-tenant losses, per side."""
    import torch

    seconds = {name: [] for name in sides}
    losses = {name: [] for name in sides}
    for round_index in range(-1, workload.repeats):
        for name, side in sides.items():
            torch.set_num_threads(side.threads)
            steps = workload.warmup if round_index < 0 else workload.steps
            began = time.perf_counter()
            losses[name] += [side.step() for _ in range(steps)]
            if round_index >= 0:
                seconds[name].append(time.perf_counter() - began)
    return seconds, {name: [list(t) for t in zip(*steps)] for name, steps in losses.items()}


# orchestration ---------------------------------------------------------------------------


def model_dir_and_entry(data_dir: Path):
    from tunemesh_common.models import ModelRegistry

    registry = ModelRegistry.default(data_dir)
    return registry.materialize(MODEL), registry.entry(MODEL)


def engine_kwargs(entry, workload: Workload) -> dict:
    return dict(name=MODEL, family=entry.family, max_lora_rank=max(workload.rank, 16),
                max_seq_len=entry.max_seq_len)


def in_process(args: argparse.Namespace, workload: Workload) -> tuple[dict, dict, dict]:
    """The torch engine (default threads and 1 thread) and sequential PEFT, interleaved."""
    import torch

    from tunemesh_trainer.engine import build_torch_engine

    model_dir, entry = model_dir_and_entry(args.data_dir)
    threads = torch.get_num_threads()
    sides: dict[str, object] = {"fused": EngineSide(build_torch_engine(model_dir, **engine_kwargs(entry, workload)),
                                                    workload, entry.vocab_size, threads)}
    if threads > 1:
        sides["fused_1_thread"] = EngineSide(build_torch_engine(model_dir, **engine_kwargs(entry, workload)),
                                             workload, entry.vocab_size, 1)
    peft = PeftSide(model_dir, sides["fused"].states, workload, entry.vocab_size, threads)
    sides["peft_sequential"] = peft
    seconds, losses = measure(sides, workload)
    torch.set_num_threads(threads)
    figures = {name: side_figures(workload, str(sides[name].threads), s) for name, s in seconds.items()}
    return figures, losses, correctness(losses["fused"], losses["peft_sequential"], peft.base_losses)


def deepspeed_child(args: argparse.Namespace, workload: Workload) -> None:
    """In a child process: lead a local group of `--child-ranks` CPU ranks, measure the
    DeepSpeed engine, write seconds and losses to `--child-json`."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from tunemesh_trainer.ranks import local_group

    model_dir, entry = model_dir_and_entry(args.data_dir)
    with local_group(args.child_ranks, threads=args.rank_threads, timeout_s=600) as group:
        engine = group.build(model_dir=model_dir, num_threads=args.rank_threads, expert_parallel=args.child_ep,
                             **engine_kwargs(entry, workload))
        side = EngineSide(engine, workload, entry.vocab_size, args.rank_threads)
        seconds, losses = measure({"deepspeed": side}, workload)
    args.child_json.write_text(json.dumps({"seconds": seconds["deepspeed"], "losses": losses["deepspeed"]}))


def deepspeed_ranks(args: argparse.Namespace, workload: Workload, world: int, expert_parallel: int = 1) -> dict:
    """Run `deepspeed_child` for `world` ranks (experts split over `expert_parallel` of
    them) in a child process; its seconds and losses."""
    with tempfile.TemporaryDirectory(prefix="tunemesh-moe-bench-") as tmp:
        out = Path(tmp) / "deepspeed.json"
        command = [sys.executable, str(Path(__file__).resolve()), *workload_argv(args),
                   "--child-ranks", str(world), "--child-ep", str(expert_parallel), "--child-json", str(out)]
        subprocess.run(command, check=True, timeout=3600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
        return json.loads(out.read_text())


def workload_argv(args: argparse.Namespace) -> list[str]:
    return ["--tenants", str(args.tenants), "--rows", str(args.rows), "--seq-len", str(args.seq_len),
            "--rank", str(args.rank), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--repeats", str(args.repeats), "--seed", str(args.seed), "--rank-threads", str(args.rank_threads),
            "--data-dir", str(args.data_dir)]


def deepspeed_sides(args: argparse.Namespace, workload: Workload, torch_losses: list) -> tuple[dict, dict, list]:
    """Each rank count's figures, its losses' max rel err against the torch engine, notes."""
    import importlib.util

    if not args.ranks:
        return {}, {}, []
    if importlib.util.find_spec("deepspeed") is None:
        return {}, {}, ["deepspeed is not installed: the DeepSpeed sides were skipped"]
    figures, errors = {}, {}
    runs = [(world, 1) for world in args.ranks] + [(world, world) for world in args.ep_ranks if world > 1]
    for world, expert_parallel in runs:
        name = f"deepspeed_{world}_rank{'s' if world > 1 else ''}" + (f"_ep{world}" if expert_parallel > 1 else "")
        log(f"{name}: starting {world} local CPU rank(s), {args.rank_threads} thread(s) each")
        child = deepspeed_ranks(args, workload, world, expert_parallel)
        figures[name] = side_figures(workload, f"{world}x{args.rank_threads}", child["seconds"])
        errors[name] = max(rel_err(a, b) for got, want in zip(child["losses"], torch_losses)
                           for a, b in zip(got, want))
        log(f"{name}: {figures[name]['tokens_per_s']:.1f} tok/s")
    notes = [f"{os.cpu_count()} CPUs: each DeepSpeed rank runs {args.rank_threads} torch thread(s); "
             f"{max(args.ranks)} ranks share the cores with nothing else of the bench running"]
    return figures, errors, notes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = Workload()
    p.add_argument("--tenants", type=int, default=defaults.tenants, help="tenants, one adapter each")
    p.add_argument("--rows", type=int, default=defaults.rows, help="datums per tenant per step")
    p.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per datum")
    p.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank (alpha = rank)")
    p.add_argument("--steps", type=int, default=defaults.steps, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed steps first (>= 1)")
    p.add_argument("--repeats", type=int, default=defaults.repeats, help="timed rounds; medians reported")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--ranks", default="1,2", help="DeepSpeed rank counts, comma-separated ('' skips DeepSpeed)")
    p.add_argument("--rank-threads", type=int, default=1, help="torch threads per DeepSpeed rank")
    p.add_argument("--data-dir", type=Path, default=Path("~/.cache/tunemesh").expanduser(), help="model cache")
    p.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "moe_throughput.json",
                   help="write the figures here (default bench/results/moe_throughput.json)")
    p.add_argument("--ep-ranks", default="2",
                   help="rank counts also run with expert parallelism over all ranks, comma-separated ('' skips)")
    p.add_argument("--child-ranks", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child-ep", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.ranks = [int(n) for n in args.ranks.split(",") if n]
    args.ep_ranks = [int(n) for n in args.ep_ranks.split(",") if n] if args.ranks else []
    if args.warmup < 1 or args.repeats < 1 or args.steps < 1 or args.tenants < 1:
        p.error("--warmup, --repeats, --steps and --tenants must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(Workload)}
    workload = Workload(**fields)
    if args.child_ranks:
        deepspeed_child(args, workload)
        return None
    load = [os.getloadavg()[0]]
    log(f"{MODEL}: torch engine and sequential PEFT, {workload.tenants} tenants")
    sides, losses, check = in_process(args, workload)
    ds_sides, ds_errors, notes = deepspeed_sides(args, workload, losses["fused"])
    sides.update(ds_sides)
    load.append(os.getloadavg()[0])
    import torch

    results = {"model": MODEL, "workload": dataclasses.asdict(workload), "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "load_average_1m": load, "sides": sides,
               "ratios": ratios(sides), "correctness": check,
               "deepspeed_vs_torch_max_rel_err": ds_errors, "notes": notes}
    print(format_report(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome is None or outcome["correctness"]["ok"] else 1)
