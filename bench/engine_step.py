"""The fused training engine alone, in process: tokens/s and model FLOP utilisation.

    python bench/engine_step.py                      # SmolLM2, 8 adapters x 2 rows x 64 tokens
    python bench/engine_step.py --adapters 8 --rows 8 --seq-len 64 --json bench/results/engine_step.json

One `TorchTrainingEngine` with `--adapters` LoRA adapters (rank `--rank` on every target,
seeded); a step = one fused `run_batch` of every adapter's forward_backward (`--rows`
random rows of `--seq-len` tokens, cross_entropy, weights 1) + each adapter's AdamW step.
One warmup step, then `--repeats` timed; MFU = training FLOPs per token
(machine.ModelShape.training_flops) x tokens/s of the median step / the best fp32 matmul
peak measured before and after. No mesh, no control plane: the engine's own ceiling,
to read train_throughput.py's mesh figures against. It also times the frozen base's GEMMs
alone at the step's shapes (`machine.frozen_gemm_gflops`): their share of the peak bounds
the MFU any engine could reach here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import ModelShape, best_peaks, frozen_gemm_gflops, measure_peaks  # noqa: E402
from train_throughput import SMOLLM2, log, write_json  # noqa: E402


def build(model_dir: Path, entry, adapters: int, rank: int):
    from tunemesh_trainer.domain import LoraSpec
    from tunemesh_trainer.engine import build_torch_engine

    engine = build_torch_engine(model_dir, name=entry.name, family=entry.family, max_lora_rank=max(rank, 8),
                                max_seq_len=entry.max_seq_len, device="cpu")
    for i in range(adapters):
        engine.create_adapter(f"a{i}", LoraSpec(rank=rank, alpha=2 * rank, seed=i))
    return engine


def batch(vocab: int, adapters: int, rows: int, seq_len: int) -> list:
    from tunemesh_trainer.domain import DatumArrays, EngineItem, ItemKind

    rng = np.random.default_rng(0)

    def datum() -> DatumArrays:
        return DatumArrays(rng.integers(0, vocab, seq_len), {"target_tokens": rng.integers(0, vocab, seq_len),
                                                             "weights": np.ones(seq_len, np.float32)})

    return [EngineItem(f"i{i}", f"a{i}", ItemKind.FORWARD_BACKWARD, [datum() for _ in range(rows)])
            for i in range(adapters)]


def step_seconds(engine, items: list, adapters: int) -> float:
    from tunemesh_trainer.domain import AdamSpec

    start = time.perf_counter()
    engine.run_batch(items)
    for i in range(adapters):
        engine.optim_step(f"a{i}", AdamSpec(learning_rate=1e-4))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-dir", type=Path, default=Path("~/.cache/tunemesh").expanduser())
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tunemesh_common.models import ModelRegistry

    registry = ModelRegistry.default(args.data_dir)
    entry, model_dir = registry.entry(args.model), registry.materialize(args.model)
    load, before = [os.getloadavg()[0]], measure_peaks()
    engine = build(model_dir, entry, args.adapters, args.rank)
    items = batch(entry.vocab_size, args.adapters, args.rows, args.seq_len)
    step_seconds(engine, items, args.adapters)  # warmup
    seconds = [step_seconds(engine, items, args.adapters) for _ in range(args.repeats)]
    machine = best_peaks(before, measure_peaks())
    tokens = args.adapters * args.rows * args.seq_len
    shape = ModelShape.from_config(model_dir)
    gemm = frozen_gemm_gflops(shape, tokens)
    load.append(os.getloadavg()[0])
    per_token = shape.training_flops(args.rows, args.seq_len, args.rank) / (args.rows * args.seq_len)
    rate = tokens / statistics.median(seconds)
    result = {"model": args.model, "adapters": args.adapters, "rows": args.rows, "seq_len": args.seq_len,
              "rank": args.rank, "step_seconds": [round(s, 4) for s in seconds], "tokens_per_s": round(rate, 1),
              "training_gflop_per_token": round(per_token / 1e9, 4),
              "mfu": round(rate * per_token / (machine["fp32_gflops"] * 1e9), 4), "machine": machine,
              "frozen_gemm_gflops": gemm, "frozen_gemm_share_of_peak": round(gemm / machine["fp32_gflops"], 4),
              "load_average_1m": load, "cpu_count": os.cpu_count()}
    log(f"{args.model}: {args.adapters} adapters x {args.rows} x {args.seq_len}: {rate:.1f} tok/s, "
        f"MFU {result['mfu']:.1%} of {machine['fp32_gflops']:.0f} GFLOP/s (steps {result['step_seconds']} s); "
        f"the base's GEMMs alone at these shapes: {gemm:.0f} GFLOP/s, {result['frozen_gemm_share_of_peak']:.1%}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
