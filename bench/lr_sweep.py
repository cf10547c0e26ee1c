"""Learning-rate sweep for LoRA SFT by rank: where tunemesh.lora_learning_rate's numbers come from.

    python bench/lr_sweep.py --model HuggingFaceTB/SmolLM2-135M-Instruct --json bench/results/lr_sweep_smollm2.json

For each rank and learning rate, a fresh adapter (alpha = rank) trains `--steps` AdamW
steps of chat SFT on the cookbook's extraction task (cookbook/sft.py data) on the
trainer engine in process, then the held-out per-token NLL is measured. The best rate
per rank, times alpha, should be about constant if the LoRA scale alpha / rank makes the
best rate rank-independent at fixed alpha (what lora_learning_rate assumes).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_throughput import log, write_json  # noqa: E402

from cookbook import common, sft  # noqa: E402


def arrays(datum):
    from tunemesh_trainer.domain import DatumArrays

    return DatumArrays(tokens=__import__("numpy").asarray(datum.model_input.to_ints()),
                       loss_inputs={k: v.to_numpy() for k, v in datum.loss_fn_inputs.items()})


def held_out_nll(engine, adapter: str, data) -> float:
    from tunemesh_trainer.domain import EngineItem, ItemKind

    outcome = engine.run_batch([EngineItem("eval", adapter, ItemKind.FORWARD, data)])[0]
    tokens = sum(float(d.loss_inputs["weights"].sum()) for d in data)
    return outcome.metrics["loss:sum"] / tokens


def train_once(engine, rank: int, lr: float, train, held_out, steps: int, batch: int) -> float:
    from tunemesh_trainer.domain import AdamSpec, EngineItem, ItemKind, LoraSpec

    adapter = f"r{rank}-lr{lr:g}"
    engine.create_adapter(adapter, LoraSpec(rank=rank, alpha=float(rank), seed=0))
    for step in range(steps):
        chunk = [train[(step * batch + i) % len(train)] for i in range(batch)]
        engine.run_batch([EngineItem(f"s{step}", adapter, ItemKind.FORWARD_BACKWARD, chunk)])
        engine.optim_step(adapter, AdamSpec(learning_rate=lr))
    nll = held_out_nll(engine, adapter, held_out)
    engine.delete_adapter(adapter)
    return nll if math.isfinite(nll) else float("inf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=common.SMOLLM2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from tunemesh_common.models import ModelRegistry
    from tunemesh_local.launcher import default_data_dir
    from tunemesh_trainer.engine import build_torch_engine

    registry = ModelRegistry.default(default_data_dir())
    entry, path = registry.entry(args.model), registry.materialize(args.model)
    engine = build_torch_engine(path, name=entry.name, family=entry.family, max_lora_rank=max(args.ranks),
                                max_seq_len=entry.max_seq_len)
    renderer = common.Renderer(AutoTokenizer.from_pretrained(str(path)))
    train_examples, eval_examples = sft.split(0, 64, 32)
    train = [arrays(renderer.supervised(e.messages(), e.answer)) for e in train_examples]
    held_out = [arrays(renderer.supervised(e.messages(), e.answer)) for e in eval_examples]
    base = held_out_nll_base(engine, held_out)
    results = {"model": args.model, "steps": args.steps, "batch": args.batch, "held_out_nll_base": base, "runs": []}
    for rank in args.ranks:
        for lr in args.lrs:
            nll = train_once(engine, rank, lr, train, held_out, args.steps, args.batch)
            log(f"rank {rank:>3} lr {lr:<7g} held-out NLL {nll:.3f} (base {base:.3f})")
            results["runs"].append({"rank": rank, "alpha": rank, "lr": lr, "held_out_nll": nll})
            write_json(args.json, results)  # after every run: a long sweep can be stopped
    results["best"] = {str(r): min((x for x in results["runs"] if x["rank"] == r), key=lambda x: x["held_out_nll"])["lr"]
                       for r in args.ranks}
    log(f"best lr by rank: {results['best']}")
    write_json(args.json, results)
    return 0


def held_out_nll_base(engine, held_out) -> float:
    from tunemesh_trainer.domain import LoraSpec

    engine.create_adapter("base", LoraSpec(rank=4, alpha=4.0))
    try:
        return held_out_nll(engine, "base", held_out)
    finally:
        engine.delete_adapter("base")


if __name__ == "__main__":
    sys.exit(main())
