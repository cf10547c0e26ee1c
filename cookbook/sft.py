"""Chat SFT: teach a terse extraction format and measure it on held-out people.

The task is generated in code: a sentence about a person ("Maria is 34 and lives in
Lima.") and the instruction to extract the name and age; the answer is exactly
"Maria, 34". Out of the box the model answers in prose, so exact-match accuracy starts
near zero. Held-out examples use names never seen in training, so what is measured is
the format learned, not memorised people.

Metrics: per-token NLL of the held-out answers (a `forward`, before, during and after
training) and exact-match accuracy of greedy samples on the held-out prompts (before
and after).

    python -m cookbook.sft --help
    python -m cookbook.sft --steps 30
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from collections.abc import Sequence
from typing import Any

import tunemesh

from cookbook import common

NAMES = (
    "Maria", "James", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Fatima", "Ivan",
    "Sofia", "Kwame", "Elena", "Raj", "Mei", "Lucas", "Amara", "Jonas", "Nadia", "Pedro",
    "Hana", "Diego", "Zara", "Felix", "Ingrid", "Tariq", "Chloe", "Mateo", "Yuki", "Samuel",
    "Leila", "Oscar", "Anya", "Bruno", "Keiko", "Emil", "Rosa", "Hugo", "Nia", "Viktor",
)
CITIES = (
    "Lima", "Oslo", "Cairo", "Kyoto", "Dublin", "Quito", "Lagos", "Porto", "Hanoi", "Perth",
    "Bergen", "Tunis", "Seville", "Krakow", "Denver", "Nairobi",
)
TEMPLATES = (
    "{name} is {age} and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "At {age}, {name} moved to {city} for work.",
    "{city} is home to {name}, who turned {age} last spring.",
    "{name}, aged {age}, has spent {years} years in {city}.",
    "After {years} years abroad, {name} ({age}) settled in {city}.",
    "Our new neighbour {name} is {age} years old and grew up in {city}.",
    "In {city}, {name} celebrated turning {age} with {years} friends.",
)
INSTRUCTION = "Extract name and age: '{text}'"


@dataclasses.dataclass(frozen=True)
class Example:
    """One extraction: the sentence and the exact answer expected."""

    text: str
    answer: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": INSTRUCTION.format(text=self.text)}]


def make_examples(count: int, names: Sequence[str], rng: random.Random) -> list[Example]:
    """`count` sentences about people drawn from `names`; ages 18-89, distractor numbers 2-15."""
    examples = []
    for _ in range(count):
        name, age = rng.choice(names), rng.randint(18, 89)
        text = rng.choice(TEMPLATES).format(name=name, age=age, city=rng.choice(CITIES), years=rng.randint(2, 15))
        examples.append(Example(text, f"{name}, {age}"))
    return examples


def split(seed: int, train_size: int, eval_size: int) -> tuple[list[Example], list[Example]]:
    """Seeded train and held-out examples; a quarter of the names appear only in held-out ones."""
    rng = random.Random(seed)
    names = list(NAMES)
    rng.shuffle(names)
    held_out = len(names) // 4
    return make_examples(train_size, names[held_out:], rng), make_examples(eval_size, names[:held_out], rng)


def exact_match(predicted: str, answer: str) -> bool:
    """The reply, stripped of surrounding whitespace, is the answer itself."""
    return predicted.strip() == answer


def per_token_nll(loss_sum: float, tokens: float) -> float:
    """Mean NLL per answer token from a summed cross-entropy loss."""
    if tokens <= 0:
        raise ValueError("no answer tokens to average over")
    return loss_sum / tokens


def answer_tokens(data: Sequence[tunemesh.Datum]) -> float:
    return float(sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in data))


def evaluate_nll(training: tunemesh.TrainingClient, data: Sequence[tunemesh.Datum]) -> float:
    """Per-token NLL of the held-out answers under the current weights (no gradients)."""
    output = training.forward(list(data), "cross_entropy").result()
    return per_token_nll(output.metrics["loss:sum"], answer_tokens(data))


def evaluate_accuracy(sampler: tunemesh.SamplingClient, renderer: common.Renderer, examples: Sequence[Example],
                      max_tokens: int) -> tuple[float, list[str]]:
    """Exact-match accuracy of greedy replies to the held-out prompts, and the replies."""
    params = tunemesh.SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=renderer.stop)
    futures = [sampler.sample(tunemesh.ModelInput.from_ints(renderer.prompt(e.messages())), 1, params)
               for e in examples]
    replies = [renderer.text(f.result().sequences[0].tokens) for f in futures]
    correct = sum(exact_match(r, e.answer) for r, e in zip(replies, examples))
    return correct / len(examples), replies


def parser() -> argparse.ArgumentParser:
    p = common.base_parser("Chat SFT on a generated extraction task; NLL and exact-match accuracy on held-out "
                           "people, before and after.", steps=24, batch=8, rank=16)
    p.add_argument("--train-size", type=int, default=192, help="training examples generated")
    p.add_argument("--eval-size", type=int, default=32, help="held-out examples (names unseen in training)")
    p.add_argument("--eval-every", type=int, default=6, help="held-out NLL every this many steps")
    p.add_argument("--max-tokens", type=int, default=16, help="longest sampled reply")
    return p


class _Run:
    """One SFT run's state: data, clients, metrics."""

    def __init__(self, service: tunemesh.ServiceClient, args: argparse.Namespace,
                 log: common.MetricsLog | None) -> None:
        self.args = args
        self.training = service.create_lora_training_client(args.model, rank=args.rank, seed=args.seed)
        self.renderer = common.Renderer(self.training.get_tokenizer())
        self.train_set, self.eval_set = split(args.seed, args.train_size, args.eval_size)
        self.eval_data = [self.renderer.supervised(e.messages(), e.answer) for e in self.eval_set]
        self.log = log or common.MetricsLog(common.log_dir(args, "sft"))
        self.base = service.create_sampling_client(base_model=args.model)
        self.lr = common.learning_rate(args)

    def batch(self, step: int) -> list[tunemesh.Datum]:
        start = step * self.args.batch
        picked = [self.train_set[(start + i) % len(self.train_set)] for i in range(self.args.batch)]
        return [self.renderer.supervised(e.messages(), e.answer) for e in picked]

    def step(self, step: int) -> float:
        data = self.batch(step)
        backward = self.training.forward_backward(data, "cross_entropy")
        self.training.optim_step(tunemesh.AdamParams(learning_rate=self.lr))
        return per_token_nll(backward.result().metrics["loss:sum"], answer_tokens(data))


def train(service: tunemesh.ServiceClient, args: argparse.Namespace, *, position: int = 0,
          log: common.MetricsLog | None = None) -> dict[str, Any]:
    """Run SFT; return before/after held-out NLL and accuracy, sample replies and the log dir."""
    run = _Run(service, args, log)
    bar = common.progress(args.steps, "sft", position)
    nll_before = evaluate_nll(run.training, run.eval_data)
    accuracy_before, replies_before = evaluate_accuracy(run.base, run.renderer, run.eval_set, args.max_tokens)
    run.log.write(0, eval_nll=nll_before, eval_accuracy=accuracy_before)
    bar.set_postfix(eval_nll=f"{nll_before:.3f}", acc=f"{accuracy_before:.2f}")
    for step in range(args.steps):
        row = {"train_nll": run.step(step)}
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            row["eval_nll"] = evaluate_nll(run.training, run.eval_data)
        run.log.write(step + 1, **row)
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items()})
        bar.update()
    nll_after = evaluate_nll(run.training, run.eval_data)
    sampler = run.training.save_weights_and_get_sampling_client()
    accuracy_after, replies_after = evaluate_accuracy(sampler, run.renderer, run.eval_set, args.max_tokens)
    run.log.write(args.steps, eval_nll=nll_after, eval_accuracy=accuracy_after)
    bar.set_postfix(eval_nll=f"{nll_after:.3f}", acc=f"{accuracy_after:.2f}")
    bar.close()
    return _finish(run, nll_before, nll_after, accuracy_before, accuracy_after, replies_before, replies_after)


def _finish(run: _Run, nll_before: float, nll_after: float, accuracy_before: float, accuracy_after: float,
            replies_before: list[str], replies_after: list[str]) -> dict[str, Any]:
    run.log.plot("loss", ["train_nll", "eval_nll"], "SFT: NLL per answer token")
    run.log.plot("accuracy", ["eval_accuracy"], "SFT: held-out exact-match accuracy")
    example = run.eval_set[0]
    summary = {
        "recipe": "sft", "metric": "eval_accuracy",
        "eval_nll_before": nll_before, "eval_nll_after": nll_after,
        "eval_accuracy_before": accuracy_before, "eval_accuracy_after": accuracy_after,
        "example": {"prompt": example.messages()[0]["content"], "answer": example.answer,
                    "before": replies_before[0], "after": replies_after[0]},
        "log_dir": str(run.log.directory),
    }
    common.write_summary(run.log.directory, summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_recipe(parser(), train, lambda s: [
        f"held-out NLL per token: {s['eval_nll_before']:.3f} -> {s['eval_nll_after']:.3f}",
        f"held-out exact match:   {s['eval_accuracy_before']:.1%} -> {s['eval_accuracy_after']:.1%}"], argv)


if __name__ == "__main__":
    sys.exit(main())
