"""What every recipe shares: a mesh to talk to, chat rendering, metrics and plots.

A recipe connects to a running mesh (`--address`, `--api-key`) or, without
`--address`, starts a local one for its own use (etcd, scheduler, checkpoint service,
one trainer, one sampler) and stops it at the end. Everything after that goes through
the public SDK only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import tunemesh

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def base_parser(description: str, *, steps: int, batch: int, rank: int = 16) -> argparse.ArgumentParser:
    """The options every recipe takes; a recipe adds its own."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mesh = parser.add_argument_group("mesh")
    mesh.add_argument("--address", default=os.environ.get("TUNEMESH_ADDRESS"),
                      help="scheduler address host:port (default $TUNEMESH_ADDRESS; "
                           "unset: start a local mesh for this run and stop it after)")
    mesh.add_argument("--api-key", default=os.environ.get("TUNEMESH_API_KEY"),
                      help="API key (default $TUNEMESH_API_KEY; with a local mesh: the key it made for alice)")
    mesh.add_argument("--sampler-engine", default="auto", choices=("auto", "torch", "vllm"),
                      help="sampler engine of a local mesh")
    train = parser.add_argument_group("training")
    train.add_argument("--model", default=SMOLLM2, help="base model")
    train.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    train.add_argument("--batch", type=int, default=batch, help="examples per step")
    train.add_argument("--rank", type=int, default=rank, help="LoRA rank (alpha = rank)")
    train.add_argument("--lr", type=float, default=None,
                       help="AdamW learning rate (default: tunemesh.lora_learning_rate for the model and rank)")
    train.add_argument("--seed", type=int, default=0, help="seed for data order, LoRA init and sampling")
    train.add_argument("--log-dir", type=pathlib.Path, default=None,
                       help="where metrics.jsonl and the plots go (default runs/<recipe>-<time>)")
    return parser


def learning_rate(args: argparse.Namespace) -> float:
    """--lr, else the LoRA learning-rate helper's value for this model and rank."""
    if args.lr is not None:
        return args.lr
    return tunemesh.lora_learning_rate(args.model, args.rank)


def log_dir(args: argparse.Namespace, recipe: str) -> pathlib.Path:
    path = args.log_dir or pathlib.Path("runs") / f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def service_client(args: argparse.Namespace) -> Iterator[tunemesh.ServiceClient]:
    """A ServiceClient on `--address`, or on a local mesh started here and stopped after."""
    with contextlib.ExitStack() as stack:
        address, api_key, ca_bundle = args.address, args.api_key, None  # TLS: $TUNEMESH_CA_BUNDLE
        if address is None:
            address, keys, ca_bundle = stack.enter_context(local_mesh(args.model, args.sampler_engine))
            api_key = api_key or keys["alice"]
        client = stack.enter_context(tunemesh.ServiceClient(address, api_key=api_key, ca_bundle=ca_bundle))
        yield client


@contextlib.contextmanager
def local_mesh(model: str, sampler_engine: str = "auto") -> Iterator[tuple[str, dict[str, str], str]]:
    """Start a local mesh serving `model` (one trainer, one sampler); yield its address,
    the API keys it made ({tenant: key}: alice, bob) and its CA's certificate (TLS)."""
    os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
    from tunemesh_local import launcher

    state_dir = pathlib.Path(tempfile.mkdtemp(prefix="tunemesh-cookbook-"))
    print(f"starting a local mesh for {model} in {state_dir} ...", flush=True)
    mesh = launcher.up(launcher.MeshConfig(
        state_dir=state_dir, models=(model,), data_dir=launcher.default_data_dir(), ready_timeout=300,
        samplers=1, sampler_engine=sampler_engine))
    try:
        yield mesh.scheduler_address, launcher.client_keys(mesh), mesh.ca_file or None
    finally:
        print("stopping the local mesh ...", flush=True)
        launcher.down(state_dir)


class Renderer:
    """Chat messages <-> tokens with the model's own chat template.

    `prompt(messages)` is what a sampler continues (ends with the assistant header);
    `supervised(messages, answer)` is an SFT datum whose loss covers the answer and the
    end-of-turn token only; `stop` ends a sampled turn.
    """

    END_OF_TURN = "<|im_end|>"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        end = tokenizer.convert_tokens_to_ids(self.END_OF_TURN)
        if not isinstance(end, int) or end < 0 or end == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {self.END_OF_TURN} token: not a ChatML model")
        self.end_of_turn = end
        self.stop = sorted({end, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})

    def prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def completion(self, text: str) -> list[int]:
        """An assistant reply's tokens, ending with the end-of-turn token."""
        return self.tokenizer.encode(text, add_special_tokens=False) + [self.end_of_turn]

    def supervised(self, messages: Sequence[Mapping[str, str]], answer: str) -> tunemesh.Datum:
        return datum(self.prompt(messages), self.completion(answer), weights=1.0)

    def text(self, tokens: Sequence[int]) -> str:
        """A sampled reply as text, without the end-of-turn token."""
        return self.tokenizer.decode([t for t in tokens if t not in self.stop], skip_special_tokens=True).strip()


def datum(prompt: Sequence[int], completion: Sequence[int], **per_token: float | Sequence[float]) -> tunemesh.Datum:
    """A datum over prompt + completion that scores only the completion.

    Position i of the model input predicts token i + 1, so the targets are the sequence
    shifted by one. Each keyword is a loss input over the completion tokens (a number is
    repeated); prompt positions get 0, so they carry no loss and no gradient.
    """
    if not prompt or not completion:
        raise ValueError("a datum needs a non-empty prompt and completion")
    tokens = list(prompt) + list(completion)
    pad = len(prompt) - 1
    inputs: dict[str, Any] = {"target_tokens": tokens[1:]}
    for key, value in per_token.items():
        values = [float(value)] * len(completion) if isinstance(value, (int, float)) else [float(v) for v in value]
        if len(values) != len(completion):
            raise ValueError(f"{key}: {len(values)} values for {len(completion)} completion tokens")
        inputs[key] = [0.0] * pad + values
    return tunemesh.Datum(model_input=tunemesh.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def completion_logprobs(output: Mapping[str, tunemesh.TensorData], completion_length: int) -> list[float]:
    """The learner's logprobs of a datum's completion tokens, from a forward output."""
    return output["logprobs"].tolist()[-completion_length:]


class MetricsLog:
    """Per-step metrics as JSON lines in `<dir>/metrics.jsonl`, and PNG plots of them."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        self.path.write_text("")

    def write(self, step: int, **metrics: float) -> dict[str, Any]:
        row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in self.rows if r.get(key) is not None]
        return [s for s, _ in points], [v for _, v in points]

    def plot(self, name: str, keys: Sequence[str], title: str | None = None) -> pathlib.Path:
        """One PNG with a line per key over steps (keys missing from every row are skipped)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
        for key in keys:
            steps, values = self.series(key)
            if steps:
                axes.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        axes.set_xlabel("step")
        axes.set_title(title or name)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        path = self.directory / f"{name}.png"
        figure.savefig(path)
        plt.close(figure)
        return path


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return float(value) if hasattr(value, "__float__") and not isinstance(value, (int, bool)) else value


def progress(total: int, desc: str, position: int = 0):
    """A tqdm bar (one line per recipe; `position` stacks bars of concurrent recipes)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, position=position, leave=True, dynamic_ncols=True)


def example_text(example: Mapping[str, str]) -> str:
    """A held-out prompt with its expected answer and the replies before and after training."""
    return (f"{example['prompt']}\n  expected: {example['answer']}\n  before:   {example['before']!r}\n"
            f"  after:    {example['after']!r}")


def run_recipe(recipe_parser: argparse.ArgumentParser, train: Callable[..., dict[str, Any]],
               headline: Callable[[Mapping[str, Any]], list[str]], argv: Sequence[str] | None = None) -> int:
    """A recipe's `main`: parse, `train(service, args)` on the mesh (or a local one), then print
    `headline(summary)`, the held-out example (if any) and where the metrics are."""
    args = recipe_parser.parse_args(argv)
    with service_client(args) as service:
        summary = train(service, args)
    lines = headline(summary)
    if "example" in summary:
        lines.append(example_text(summary["example"]))
    took = f" ({summary['seconds']:.0f} s)" if "seconds" in summary else ""
    lines.append(f"metrics and plots in {summary['log_dir']}{took}")
    print("\n".join(lines))
    return 0


def write_summary(directory: pathlib.Path, summary: Mapping[str, Any]) -> pathlib.Path:
    path = pathlib.Path(directory) / "summary.json"
    path.write_text(json.dumps(dict(summary), indent=2) + "\n")
    return path
