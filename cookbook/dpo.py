"""DPO: prefer terse correct answers over rambling ones, from generated preference pairs.

Each pair is an arithmetic question with a chosen reply that is just the number and a
rejected reply that wraps an answer (half the time a wrong one) in filler. The reference
model is the starting weights: their logprobs of every chosen and rejected reply are
computed once, up front, through a sampling client (`compute_logprobs`). Training runs
the DPO loss through `forward_backward_custom`:

    margin = beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))
    loss   = mean over pairs of -log sigmoid(margin)

Held-out metrics (before, during and after): the DPO loss, preference accuracy (the
fraction of pairs with an implicit reward margin > 0, beyond numerical noise) and the mean
margin.

    python -m cookbook.dpo --help
    python -m cookbook.dpo --beta 0.1
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

QUESTIONS = (
    ("What is {a} + {b}?", lambda a, b: a + b),
    ("What is {a} plus {b}?", lambda a, b: a + b),
    ("Add {a} and {b}.", lambda a, b: a + b),
    ("What is {a} - {b}?", lambda a, b: a - b),
    ("Subtract {b} from {a}.", lambda a, b: a - b),
    ("What is {a} times {b}?", lambda a, b: a * b),
)
OPENINGS = (
    "Sure! Let me think about this step by step.",
    "Great question! Arithmetic can be tricky, so let's be careful.",
    "Okay, let's work through this together.",
    "Of course. First, let's look at the two numbers involved.",
)
CLOSINGS = (
    "I hope this helps!",
    "Let me know if you have any other questions.",
    "Math is fun when you take it one step at a time!",
    "Feel free to ask if anything is unclear.",
)

NOISE = 1e-4
"""Margins within this of zero are numerical noise between the sampler's and the trainer's
logprobs (the margins of the starting weights): no preference either way."""


@dataclasses.dataclass(frozen=True)
class Pair:
    """A question and two replies, the first preferred."""

    question: str
    chosen: str
    rejected: str


@dataclasses.dataclass(frozen=True)
class TokenPair:
    """A pair as tokens, with the reference model's summed logprobs of each reply."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_chosen: float
    ref_rejected: float

    def data(self) -> list[tunemesh.Datum]:
        """The chosen and the rejected datum, in that order; weights mark the reply tokens."""
        return [common.datum(self.prompt, self.chosen, weights=1.0),
                common.datum(self.prompt, self.rejected, weights=1.0)]


def make_pairs(count: int, rng: random.Random) -> list[Pair]:
    """`count` questions on numbers 2-49; rejected replies ramble, half of them to a wrong result."""
    pairs = []
    for _ in range(count):
        template, compute = rng.choice(QUESTIONS)
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        result = compute(a, b)
        shown = result if rng.random() < 0.5 else result + rng.choice((-3, -2, -1, 1, 2, 3))
        rambling = f"{rng.choice(OPENINGS)} {template.format(a=a, b=b).rstrip('?.')} gives {shown}. " \
                   f"So the answer is {shown}. {rng.choice(CLOSINGS)}"
        pairs.append(Pair(template.format(a=a, b=b), str(result), rambling))
    return pairs


def split(seed: int, train_size: int, eval_size: int) -> tuple[list[Pair], list[Pair]]:
    """Seeded training and held-out pairs (held-out questions are not in the training set)."""
    rng = random.Random(seed)
    train = make_pairs(train_size, rng)
    seen = {p.question for p in train}
    held_out: list[Pair] = []
    while len(held_out) < eval_size:
        held_out.extend(p for p in make_pairs(eval_size, rng) if p.question not in seen)
    return train, held_out[:eval_size]


def reply_logprob(logprobs: Sequence[float | None], reply_length: int) -> float:
    """Summed logprob of the last `reply_length` tokens from a `compute_logprobs` result."""
    if reply_length <= 0 or reply_length >= len(logprobs):
        raise ValueError(f"a reply of {reply_length} tokens in a sequence of {len(logprobs)}")
    return float(sum(logprobs[-reply_length:]))


def margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Implicit reward margins, beta * (chosen log-ratio - rejected log-ratio); numbers or tensors."""
    return beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))


def dpo_loss(margins_p):
    """Mean over pairs of -log sigmoid(margin), for a torch tensor of margins."""
    import torch.nn.functional as F

    return -F.logsigmoid(margins_p).mean()


class DpoLossFn:
    """The loss for `forward_backward_custom` over data laid out chosen, rejected, chosen, ..."""

    def __init__(self, pairs: Sequence[TokenPair], beta: float) -> None:
        self.pairs = list(pairs)
        self.beta = beta

    def __call__(self, data: Sequence[tunemesh.Datum], logprobs: Sequence[Any]) -> tuple[Any, dict[str, float]]:
        import torch

        if len(data) != 2 * len(self.pairs) or len(logprobs) != len(data):
            raise ValueError(f"{len(data)} datums and {len(logprobs)} logprobs for {len(self.pairs)} pairs")
        sums = torch.stack([(lp * d.loss_fn_inputs["weights"].to_torch().to(lp)).sum()
                            for d, lp in zip(data, logprobs)])
        ref = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in self.pairs], dtype=sums.dtype)
        margins_p = margins(sums[0::2], sums[1::2], ref[:, 0], ref[:, 1], self.beta)
        return dpo_loss(margins_p), {"accuracy": float((margins_p > NOISE).float().mean()),
                                     "margin": float(margins_p.detach().mean())}


def tokenize(pairs: Sequence[Pair], renderer: common.Renderer, reference: tunemesh.SamplingClient) -> list[TokenPair]:
    """Render each pair and score both replies once with the reference sampler."""
    rendered = [(renderer.prompt([{"role": "user", "content": p.question}]), renderer.completion(p.chosen),
                 renderer.completion(p.rejected)) for p in pairs]
    futures = [(reference.compute_logprobs(tunemesh.ModelInput.from_ints(prompt + chosen)),
                reference.compute_logprobs(tunemesh.ModelInput.from_ints(prompt + rejected)))
               for prompt, chosen, rejected in rendered]
    return [TokenPair(prompt, chosen, rejected, reply_logprob(c.result(), len(chosen)),
                      reply_logprob(r.result(), len(rejected)))
            for (prompt, chosen, rejected), (c, r) in zip(rendered, futures)]


def evaluate(training: tunemesh.TrainingClient, pairs: Sequence[TokenPair], beta: float) -> dict[str, float]:
    """Held-out DPO loss, preference accuracy and mean margin under the current weights."""
    outputs = training.forward([d for p in pairs for d in p.data()], "cross_entropy").result().loss_fn_outputs
    values = [margins(sum(common.completion_logprobs(chosen, len(p.chosen))),
                      sum(common.completion_logprobs(rejected, len(p.rejected))), p.ref_chosen, p.ref_rejected, beta)
              for p, chosen, rejected in zip(pairs, outputs[0::2], outputs[1::2])]
    return summarize_margins(values)


def summarize_margins(values: Sequence[float]) -> dict[str, float]:
    """DPO loss, accuracy (margin > 0, beyond noise) and mean margin of a set of pairs' margins."""
    import torch

    tensor = torch.tensor(list(values), dtype=torch.float64)
    return {"eval_loss": float(dpo_loss(tensor)), "eval_accuracy": float((tensor > NOISE).double().mean()),
            "eval_margin": float(tensor.mean())}


def parser() -> argparse.ArgumentParser:
    p = common.base_parser("DPO on generated preference pairs (terse correct over rambling); held-out "
                           "preference accuracy and implicit reward margin, before and after.",
                           steps=10, batch=8, rank=16)
    p.add_argument("--beta", type=float, default=0.1, help="DPO temperature on the log-ratio margin")
    p.add_argument("--train-size", type=int, default=64, help="training pairs generated")
    p.add_argument("--eval-size", type=int, default=32, help="held-out pairs")
    p.add_argument("--eval-every", type=int, default=5, help="held-out evaluation every this many steps")
    return p


def train(service: tunemesh.ServiceClient, args: argparse.Namespace, *, position: int = 0,
          log: common.MetricsLog | None = None) -> dict[str, Any]:
    """Run DPO; return before/after held-out preference accuracy, margin and loss, and the log dir."""
    training = service.create_lora_training_client(args.model, rank=args.rank, seed=args.seed)
    renderer = common.Renderer(training.get_tokenizer())
    reference = service.create_sampling_client(base_model=args.model)
    train_pairs, eval_pairs = (tokenize(pairs, renderer, reference)
                               for pairs in split(args.seed, args.train_size, args.eval_size))
    log = log or common.MetricsLog(common.log_dir(args, "dpo"))
    lr, bar = common.learning_rate(args), common.progress(args.steps, "dpo", position)
    before = evaluate(training, eval_pairs, args.beta)
    log.write(0, **before)
    for step in range(args.steps):
        batch = [train_pairs[(step * args.batch + i) % len(train_pairs)] for i in range(args.batch)]
        backward = training.forward_backward_custom([d for p in batch for d in p.data()], DpoLossFn(batch, args.beta))
        training.optim_step(tunemesh.AdamParams(learning_rate=lr))
        metrics = backward.result().metrics  # the batch's loss (loss:sum is the custom loss) before this step
        row = {"train_loss": metrics["loss:sum"], "train_accuracy": metrics["accuracy"],
               "train_margin": metrics["margin"]}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            row.update(evaluate(training, eval_pairs, args.beta))
        log.write(step + 1, **row)
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k.startswith(("train_loss", "eval_acc"))})
        bar.update()
    bar.close()
    after = {k: v for k, v in log.rows[-1].items() if k.startswith("eval_")} if args.steps else before
    return _finish(log, before, after, args.beta)


def _finish(log: common.MetricsLog, before: dict[str, float], after: dict[str, float], beta: float) -> dict[str, Any]:
    log.plot("loss", ["train_loss", "eval_loss"], "DPO loss")
    log.plot("accuracy", ["train_accuracy", "eval_accuracy"], "DPO: preference accuracy (margin > 0)")
    log.plot("margin", ["train_margin", "eval_margin"], f"DPO: implicit reward margin (beta {beta})")
    summary = {"recipe": "dpo", "metric": "eval_accuracy", "beta": beta,
               **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
               "log_dir": str(log.directory)}
    common.write_summary(log.directory, summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_recipe(parser(), train, lambda s: [
        f"held-out preference accuracy: {s['eval_accuracy_before']:.1%} -> {s['eval_accuracy_after']:.1%}",
        f"held-out mean margin:         {s['eval_margin_before']:+.3f} -> {s['eval_margin_after']:+.3f}",
        f"held-out DPO loss:            {s['eval_loss_before']:.3f} -> {s['eval_loss_after']:.3f}"], argv)


if __name__ == "__main__":
    sys.exit(main())
