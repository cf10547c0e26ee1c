"""The price of batch invariance: the trainer's and the torch sampler's throughput with
`batch_invariant` on and off, side by side, in process (no mesh).

    python bench/batch_invariance.py --json bench/results/batch_invariance.json
    python bench/batch_invariance.py --configs tunemesh/tiny-dense:float32 --repeats 5

For each model and base dtype, two trainers and two samplers are loaded (one per mode)
with the same `--adapters` random LoRA adapters, and the workloads run in alternating
rounds (invariant, fast, invariant, ...) so machine noise falls on both; medians are
reported, with the load average before and after.

- train: one fused forward_backward of every adapter (`--rows` rows of `--seq-len` tokens);
- sample: every adapter's `--prompts` prompts of `--prompt-len` tokens, `--new-tokens`
  greedy tokens each, all at once (continuous batching);
- decode1: one prompt, one sample: the case where the invariant mode pads its GEMMs most.

Aim (issue 18): invariant / fast >= 0.8 on each workload.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import SMOLLM2, TINY, log, write_json  # noqa: E402

MODES = {"invariant": True, "fast": False}


def random_adapter(trainer, adapter_id: str, spec, seed: int, std: float = 0.02) -> None:
    """Create `adapter_id` with random factors (a fresh LoRA's B is zero: it would change nothing)."""
    from tunemesh_trainer.domain import AdapterState

    trainer.create_adapter(adapter_id, spec)
    rng = np.random.default_rng(seed)
    weights = {n: rng.normal(0.0, std, t.shape).astype(np.float32)
               for n, t in trainer.adapter(adapter_id).weights().items()}
    trainer.import_adapter(adapter_id, AdapterState(spec, weights))


def engines(model_dir: Path, entry, dtype: str, args, adapter_root: Path) -> dict:
    """Per mode: a trainer with the adapters, and a sampler with the same adapters loaded."""
    from tunemesh_sampler.engine import build_torch_engine as build_sampler
    from tunemesh_trainer import checkpoint_files
    from tunemesh_trainer.domain import LoraSpec
    from tunemesh_trainer.engine import build_torch_engine as build_trainer

    common = dict(name=entry.name, family=entry.family, max_lora_rank=max(args.rank, 8),
                  max_seq_len=entry.max_seq_len, dtype=dtype)
    built = {}
    for mode, invariant in MODES.items():
        trainer = build_trainer(model_dir, batch_invariant=invariant, **common)
        sampler = build_sampler(model_dir, batch_invariant=invariant, **common)
        for i in range(args.adapters):
            random_adapter(trainer, f"a{i}", LoraSpec(rank=args.rank, alpha=2.0 * args.rank, seed=i), seed=i)
            directory = checkpoint_files.write_directory(trainer.export_adapter(f"a{i}", False), "base",
                                                         adapter_root / mode / f"a{i}")
            sampler.load_adapter(f"a{i}", directory)
        built[mode] = (trainer, sampler)
    return built


def train_step(trainer, args, vocab: int, seed: int) -> tuple[float, int]:
    from tunemesh_trainer.domain import DatumArrays, EngineItem, ItemKind

    rng = np.random.default_rng(seed)
    items = []
    for i in range(args.adapters):
        data = [DatumArrays(rng.integers(0, vocab, args.seq_len),
                            {"target_tokens": rng.integers(0, vocab, args.seq_len),
                             "weights": np.ones(args.seq_len, np.float32)}) for _ in range(args.rows)]
        items.append(EngineItem(f"x{i}", f"a{i}", ItemKind.FORWARD_BACKWARD, data))
    start = time.perf_counter()
    outcomes = trainer.run_batch(items)
    elapsed = time.perf_counter() - start
    assert all(o.failure is None for o in outcomes), [o.failure for o in outcomes if o.failure]
    for i in range(args.adapters):
        trainer.adapter(f"a{i}").drop_fresh_grads()
    return elapsed, args.adapters * args.rows * args.seq_len


def sample_wave(sampler, args, vocab: int, seed: int, adapters: int, prompts: int) -> tuple[float, int]:
    from tunemesh_sampler.domain import GenerateRequest, SamplingSpec

    rng = np.random.default_rng(seed)
    spec = SamplingSpec(max_tokens=args.new_tokens, temperature=0.0, stop_token_ids=())
    requests = [GenerateRequest(adapter_key=f"a{i}", prompt_tokens=tuple(rng.integers(1, vocab, args.prompt_len).tolist()),
                                num_samples=1, spec=spec, tenant=f"t{i}")
                for i in range(adapters) for _ in range(prompts)]

    async def run():
        return await asyncio.gather(*(sampler.generate(r) for r in requests))

    start = time.perf_counter()
    results = asyncio.run(run())
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(seq.tokens) for result in results for seq in result)


def bench_config(name: str, dtype: str, args) -> dict:
    from tunemesh_common.models import ModelRegistry

    registry = ModelRegistry.default(args.data_dir)
    entry, model_dir = registry.entry(name), registry.materialize(name)
    with tempfile.TemporaryDirectory() as tmp:
        built = engines(model_dir, entry, dtype, args, Path(tmp))
        vocab = built["invariant"][0].info.vocab_size
        workloads = {
            "train": lambda engines, seed: train_step(engines[0], args, vocab, seed),
            "sample": lambda engines, seed: sample_wave(engines[1], args, vocab, seed, args.adapters, args.prompts),
            "decode1": lambda engines, seed: sample_wave(engines[1], args, vocab, seed, 1, 1),
        }
        figures = {}
        for workload, run in workloads.items():
            for mode in MODES:
                run(built[mode], 0)  # warmup
            rates: dict[str, list[float]] = {mode: [] for mode in MODES}
            for repeat in range(args.repeats):
                for mode in MODES:
                    elapsed, tokens = run(built[mode], repeat + 1)
                    rates[mode].append(tokens / elapsed)
            medians = {mode: statistics.median(r) for mode, r in rates.items()}
            figures[workload] = {"tokens_per_s": medians, "runs": rates,
                                 "invariant_over_fast": medians["invariant"] / medians["fast"]}
            log(f"{name} {dtype} {workload}: invariant {medians['invariant']:.1f} tok/s, fast "
                f"{medians['fast']:.1f} tok/s, ratio {figures[workload]['invariant_over_fast']:.3f}")
        for trainer, sampler in built.values():
            sampler.close()
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=f"{TINY}:float32,{SMOLLM2}:float32,{SMOLLM2}:bfloat16",
                   help="comma-separated model:dtype")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rows", type=int, default=2, help="train: rows per adapter")
    p.add_argument("--seq-len", type=int, default=64, help="train: tokens per row")
    p.add_argument("--prompts", type=int, default=2, help="sample: prompts per adapter")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-dir", type=Path, default=Path("~/.cache/tunemesh").expanduser())
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = {"load_before": os.getloadavg(), "args": {k: str(v) for k, v in vars(args).items()}, "configs": {}}
    for config in args.configs.split(","):
        name, _, dtype = config.rpartition(":")
        results["configs"][config] = bench_config(name, dtype, args)
    results["load_after"] = os.getloadavg()
    write_json(args.json, results)


if __name__ == "__main__":
    main()
