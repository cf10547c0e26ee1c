"""Checkpoint save and load latency against adapter size, through the mesh vs in process.

    python bench/checkpoint_latency.py                       # SmolLM2-135M, ranks 8..128
    python bench/checkpoint_latency.py --quick               # tiny-dense, ranks 8 and 32
    python bench/checkpoint_latency.py --json bench/results/checkpoint_latency.json

Mesh: `tunemesh_local.launcher.up` (etcd, checkpoint service, one trainer, scheduler).
Per rank, one run with LoRA on every target (attention, MLP, lm_head), `--repeats` times:
one training step (so AdamW state exists; not timed), then `save_state` (weights + optimizer),
`save_weights_for_sampler` (weights), `load_state_with_optimizer` and `load_state`, each
timed from the SDK call to its result (snapshot, encode, stream over gRPC, fsync, rename;
or fetch, verify, decode, load). Baseline, after the mesh is down: the same sizes saved
and loaded by one in-process HF PEFT model (`save_pretrained` of the adapter and
`torch.save` of the AdamW state, with fsync; `load_state_dict` back). Medians reported;
ratio = mesh / in-process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import SMOLLM2, TINY, BenchMesh, load_base, log, write_json  # noqa: E402

OPERATIONS = ("save_state", "save_sampler", "load_state_with_optimizer", "load_state")
LR = 1e-4


def median_ms(seconds: list[float]) -> float:
    return round(float(np.median(seconds)) * 1e3, 2)


def summarize(rank: int, sizes: dict[str, int], mesh_s: dict[str, list[float]],
              local_s: dict[str, list[float]]) -> dict:
    """One table row: sizes, median latencies (ms) on both sides and mesh / in-process."""
    row = {"rank": rank, "state_mb": round(sizes["state"] / 2**20, 2), "sampler_mb": round(sizes["sampler"] / 2**20, 2)}
    for op in OPERATIONS:
        row[f"{op}_ms"] = median_ms(mesh_s[op])
        row[f"{op}_local_ms"] = median_ms(local_s[op])
        row[f"{op}_ratio"] = round(float(np.median(mesh_s[op]) / np.median(local_s[op])), 2)
    return row


def format_report(result: dict) -> str:
    lines = [f"checkpoint latency, {result['model']} (medians of {result['repeats']}; mesh ms / in-process ms = ratio)",
             "rank | state MB | sampler MB | save_state | save_sampler | load_state+opt | load_state"]
    for r in result["rows"]:
        cells = [f"{r[f'{op}_ms']:.0f} / {r[f'{op}_local_ms']:.0f} = {r[f'{op}_ratio']}" for op in OPERATIONS]
        lines.append(f"{r['rank']:>4} | {r['state_mb']:>8} | {r['sampler_mb']:>10} | " + " | ".join(cells))
    return "\n".join(lines)


def _timed(call) -> tuple[float, object]:
    start = time.perf_counter()
    value = call()
    return time.perf_counter() - start, value


def _datum(vocab_size: int):
    import tunemesh

    tokens = list(np.random.default_rng(0).integers(0, vocab_size, 33))
    return tunemesh.Datum(tunemesh.ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:]})


def mesh_latencies(mesh: BenchMesh, model: str, vocab: int, rank: int, repeats: int) -> tuple[dict, dict]:
    import tunemesh

    times = {op: [] for op in OPERATIONS}
    with tunemesh.ServiceClient(mesh.address, mesh.keys[0]) as service:
        run = service.create_lora_training_client(model, rank=rank, seed=1)
        sizes = {}
        for i in range(repeats):
            # a step first, every time: the weights-only load below restarts the optimizer
            run.forward_backward([_datum(vocab)], "cross_entropy").result()
            run.optim_step(tunemesh.AdamParams(learning_rate=LR)).result()
            seconds, state = _timed(lambda: run.save_state(f"r{rank}-s{i}").result())
            times["save_state"].append(seconds)
            seconds, sampler = _timed(lambda: run.save_weights_for_sampler(f"r{rank}-w{i}").result())
            times["save_sampler"].append(seconds)
            times["load_state_with_optimizer"].append(_timed(lambda: run.load_state_with_optimizer(state.path).result())[0])
            times["load_state"].append(_timed(lambda: run.load_state(sampler.path).result())[0])
            sizes = {"state": state.checkpoint.size_bytes, "sampler": sampler.checkpoint.size_bytes}
            assert state.checkpoint.size_bytes > 2.5 * sizes["sampler"], "the state lacks its AdamW moments"
        checkpoints = service.create_checkpoint_client()
        for checkpoint in list(checkpoints.list(run=run.run)):
            checkpoints.delete(checkpoint.path)
        run.delete()
    return times, sizes


def local_latencies(base, rank: int, repeats: int, root: Path) -> dict:
    """One in-process PEFT adapter saved to and loaded from local disk (fsync'd)."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    model(input_ids=torch.arange(32)[None], labels=torch.arange(32)[None]).loss.backward()
    optimizer.step()
    times = {op: [] for op in OPERATIONS}
    for i in range(repeats):
        state_dir, sampler_dir = root / f"r{rank}-s{i}", root / f"r{rank}-w{i}"

        def save(directory: Path, with_optimizer: bool) -> None:
            model.save_pretrained(directory, save_embedding_layers=False)  # the adapter alone, like the mesh
            if with_optimizer:
                torch.save(optimizer.state_dict(), directory / "optimizer.pt")
            for path in directory.iterdir():
                with path.open("rb") as f:
                    os.fsync(f.fileno())

        def load(directory: Path, with_optimizer: bool) -> None:
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(directory / "adapter_model.safetensors"))
            if with_optimizer:
                optimizer.load_state_dict(torch.load(directory / "optimizer.pt"))

        times["save_state"].append(_timed(lambda: save(state_dir, True))[0])
        times["save_sampler"].append(_timed(lambda: save(sampler_dir, False))[0])
        times["load_state_with_optimizer"].append(_timed(lambda: load(state_dir, True))[0])
        times["load_state"].append(_timed(lambda: load(sampler_dir, False))[0])
    assert get_peft_model_state_dict(model)  # the adapter is really there
    model.unload()
    return times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=SMOLLM2, help="registry name (default SmolLM2-135M-Instruct)")
    p.add_argument("--ranks", default="8,16,32,64,128", help="comma-separated LoRA ranks")
    p.add_argument("--repeats", type=int, default=5, help="measurements per operation (medians reported)")
    p.add_argument("--data-dir", type=Path, default=Path("~/.cache/tunemesh").expanduser(), help="model cache")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--quick", action="store_true", help="tiny-dense, ranks 8 and 32, 2 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.ranks, args.repeats = TINY, "8,32", 2
    args.ranks = [int(r) for r in args.ranks.split(",") if r]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
    from tunemesh_common.models import ModelRegistry

    registry = ModelRegistry.default(args.data_dir)
    entry, model_dir = registry.entry(args.model), registry.materialize(args.model)
    mesh_s, sizes = {}, {}
    with tempfile.TemporaryDirectory(prefix="tunemesh-bench-ckpt-") as root:
        with BenchMesh(args.model, args.data_dir, Path(root) / "mesh", 1) as mesh:
            for rank in args.ranks:
                mesh_s[rank], sizes[rank] = mesh_latencies(mesh, args.model, entry.vocab_size, rank, args.repeats)
                log(f"rank {rank}: mesh save_state {median_ms(mesh_s[rank]['save_state'])} ms")
        rows = []
        for rank in args.ranks:
            local = local_latencies(load_base(model_dir), rank, args.repeats, Path(root) / "local")
            rows.append(summarize(rank, sizes[rank], mesh_s[rank], local))
            log(f"rank {rank}: in-process save_state {rows[-1]['save_state_local_ms']} ms")
    result = {"model": args.model, "repeats": args.repeats, "cpu_count": os.cpu_count(), "rows": rows}
    print(format_report(result))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
