"""GRPO-style RL on a verifiable task: small-number addition, exact-match reward.

Every step saves the current weights for sampling, samples a group of completions per
problem (temperature 1, the sampler's logprobs kept), rewards each completion by the
last integer in it (1 if it is the sum), and gives each completion its group-relative
advantage (reward minus the group mean, over the group's standard deviation; groups
where every completion scored the same teach nothing and are skipped). The trainer's
`importance_sampling` loss then weighs each token by exp(learner lp - sampler lp) times
its advantage, divided by the step's completion tokens so the loss is a per-token mean.

The prompt is the bare question in the model's chat template ("What is 16 + 10?"). A
reply ends at the end of its turn or its first line break and is cut at `--max-tokens`
(12): room for "16 + 10 = 26", not for an explanation first. SmolLM2 out of the box
answers that way about a quarter of the time and otherwise starts to explain ("To solve
this, we need to..."); it gets the sum right far more often when it writes the equation
than when it answers with a bare number (a 3-shot prompt of bare answers: about 20 %
greedy, and RL did not lift it), so RL's quick win is the equation-first habit. Metric:
greedy exact-match accuracy on distinct held-out problems (none in training), before,
during (`--eval-every`) and after, with the same prompt, stops and budget as training.
Each step also logs how on-policy it was, over its sampled tokens: the mean and max
|sampler lp - trainer lp| (`onpolicy/logprob_abs_diff_mean`, `_max`) and the importance
ratios exp(trainer lp - sampler lp) (`onpolicy/ratio_mean`, `_min`, `_max`); a sampler
that agrees with the trainer bit for bit gives exactly 0 and 1 on an on-policy step.

`--off-policy` samples step t+1's groups from the weights before step t's update while
step t trains (one step of lag, corrected by the importance ratio).

    python -m cookbook.rl --help
    python -m cookbook.rl --steps 6
    python -m cookbook.rl --model tunemesh/tiny-dense --task number --lr 1e-2
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tunemesh

from cookbook import common, tasks

# Losses over (target_tokens, logprobs, advantages) on the trainer; "reinforce" is
# cross_entropy with the advantages as weights (the on-policy REINFORCE surrogate).
LOSSES = ("importance_sampling", "ppo", "cispo", "dro", "reinforce")
DRO_BETA = 0.05


def parser() -> argparse.ArgumentParser:
    p = common.base_parser("GRPO-style RL on generated addition problems (exact-match reward); held-out greedy "
                           "accuracy before and after.", steps=8, batch=8, rank=16)
    p.add_argument("--task", default="add", choices=sorted(tasks.TASKS),
                   help="add: a + b, graded by the reply's last integer; number: any all-digit reply "
                        "(learnable from scratch, for tiny models)")
    p.add_argument("--max-operand", type=int, default=20, help="largest operand of an addition")
    p.add_argument("--group-size", type=int, default=8, help="completions sampled per problem")
    p.add_argument("--max-tokens", type=int, default=12,
                   help="longest sampled reply: room for 'a + b = sum' (SmolLM2 writes a digit per token), not for "
                        "an explanation first")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    p.add_argument("--loss", default="importance_sampling", choices=LOSSES, help="policy-gradient loss")
    p.add_argument("--format-bonus", type=float, default=0.0, help="reward added to a reply that is a bare integer")
    p.add_argument("--no-std", action="store_true", help="advantages are reward - group mean, not divided by std")
    p.add_argument("--off-policy", action="store_true",
                   help="sample the next step's groups with the pre-update weights while this step trains")
    p.add_argument("--eval-size", type=int, default=64, help="held-out problems (distinct, none in training)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out accuracy every this many steps (0: before/after)")
    return p


@dataclasses.dataclass
class Group:
    """One problem's sampled completions and their rewards."""

    problem: tasks.Problem
    prompt: list[int]
    sequences: list[tunemesh.SampledSequence]
    rewards: list[float]
    correct: list[bool]


def group_advantages(rewards: Sequence[float], scale_by_std: bool = True, eps: float = 1e-6) -> list[float]:
    """Reward minus the group mean (over the group std if asked); all zero when the rewards are equal."""
    if not rewards:
        raise ValueError("a group needs at least one reward")
    mean = statistics.fmean(rewards)
    std = statistics.pstdev(rewards)
    if std < eps:
        return [0.0] * len(rewards)
    scale = std if scale_by_std else 1.0
    return [(r - mean) / scale for r in rewards]


def groups_with_spread(groups: Sequence[Group], scale_by_std: bool = True) -> list[tuple[Group, list[float]]]:
    """The groups with reward variance (the others teach nothing), each with its advantages."""
    kept = [(g, group_advantages(g.rewards, scale_by_std)) for g in groups]
    return [(g, a) for g, a in kept if any(a)]


def step_datums(groups: Sequence[Group], loss: str, scale_by_std: bool = True) -> list[tunemesh.Datum]:
    """One datum per completion of a group with reward variance; advantages per token are the
    completion's advantage over the step's completion tokens (so the loss is a per-token mean)."""
    kept = groups_with_spread(groups, scale_by_std)
    tokens = sum(len(s.tokens) for g, _ in kept for s in g.sequences)
    data = []
    for group, advantages in kept:
        for sequence, advantage in zip(group.sequences, advantages):
            per_token = advantage / tokens
            if loss == "reinforce":
                data.append(common.datum(group.prompt, sequence.tokens, weights=per_token))
            else:
                data.append(common.datum(group.prompt, sequence.tokens, logprobs=sequence.logprobs,
                                         advantages=per_token))
    return data


def sampled_logprobs(sequences: Sequence[tunemesh.SampledSequence],
                     outputs: Sequence[Mapping[str, tunemesh.TensorData]]) -> tuple[np.ndarray, np.ndarray]:
    """The sampler's and the trainer's logprobs of the sampled tokens, over the datums of
    `sequences` (one trainer output each, whose last len(tokens) positions are the completion's)."""
    sampler = [lp for s in sequences for lp in s.logprobs]
    trainer = [lp for s, o in zip(sequences, outputs, strict=True)
               for lp in common.completion_logprobs(o, len(s.tokens))]
    return np.asarray(sampler, dtype=np.float64), np.asarray(trainer, dtype=np.float64)


def onpolicy_metrics(sampler_lp: np.ndarray, trainer_lp: np.ndarray) -> dict[str, float]:
    """How far the trainer's logprobs of the sampled tokens are from the sampler's: mean and max
    |difference| and the importance ratios exp(trainer - sampler); 0 and 1 when they agree."""
    sampler_lp, trainer_lp = np.asarray(sampler_lp, np.float64), np.asarray(trainer_lp, np.float64)
    if sampler_lp.shape != trainer_lp.shape or not sampler_lp.size:
        raise ValueError(f"need equal, non-empty logprobs: {sampler_lp.shape} vs {trainer_lp.shape}")
    diff = trainer_lp - sampler_lp
    ratio = np.exp(diff)
    return {"onpolicy/logprob_abs_diff_mean": float(np.abs(diff).mean()),
            "onpolicy/logprob_abs_diff_max": float(np.abs(diff).max()),
            "onpolicy/ratio_mean": float(ratio.mean()), "onpolicy/ratio_min": float(ratio.min()),
            "onpolicy/ratio_max": float(ratio.max())}


def stop_tokens(renderer: common.Renderer) -> list[int]:
    """Where a sampled reply ends: the end of the turn, or a line break (a reply is one line)."""
    breaks = [renderer.tokenizer.encode(text, add_special_tokens=False) for text in ("\n", "\n\n")]
    return sorted({*renderer.stop, *(ids[0] for ids in breaks if len(ids) == 1)})


def loss_config(loss: str) -> tuple[str, dict[str, float] | None]:
    """The trainer's loss name and config for a `--loss` choice."""
    if loss == "reinforce":
        return "cross_entropy", None
    return loss, ({"beta": DRO_BETA} if loss == "dro" else None)


class Rollouts:
    """Samples groups for problems and grades them."""

    def __init__(self, renderer: common.Renderer, task: tasks.Task, args: argparse.Namespace) -> None:
        self.renderer, self.task, self.args = renderer, task, args
        self.stop = stop_tokens(renderer)

    def start(self, sampler: tunemesh.SamplingClient, batch: Sequence[tasks.Problem], seed: int) -> list[Any]:
        """Submit one sample request of `group_size` completions per problem; returns pending groups."""
        pending = []
        for i, problem in enumerate(batch):
            prompt = self.renderer.prompt(problem.messages())
            params = tunemesh.SamplingParams(max_tokens=self.args.max_tokens, temperature=self.args.temperature,
                                             stop=self.stop, seed=seed * 1000 + i)
            future = sampler.sample(tunemesh.ModelInput.from_ints(prompt), self.args.group_size, params)
            pending.append((problem, prompt, future))
        return pending

    def finish(self, pending: Sequence[Any]) -> list[Group]:
        """Wait for the pending groups and grade every completion."""
        groups = []
        for problem, prompt, future in pending:
            sequences = future.result().sequences
            replies = [self.renderer.text(s.tokens) for s in sequences]
            groups.append(Group(problem, prompt, sequences,
                                [tasks.reward(self.task, problem, r, self.args.format_bonus) for r in replies],
                                [self.task.correct(problem, r) for r in replies]))
        return groups


class _Run:
    """One RL run's state: problems, clients, metrics."""

    def __init__(self, service: tunemesh.ServiceClient, args: argparse.Namespace,
                 log: common.MetricsLog | None) -> None:
        self.args = args
        self.task = tasks.task(args.task, args.max_operand)
        self.train_set, self.eval_set = tasks.split(self.task, args.steps * args.batch, args.eval_size, args.seed)
        self.training = service.create_lora_training_client(args.model, rank=args.rank, seed=args.seed)
        self.renderer = common.Renderer(self.training.get_tokenizer())
        self.rollouts = Rollouts(self.renderer, self.task, args)
        self.log = log or common.MetricsLog(common.log_dir(args, "rl"))
        self.lr = common.learning_rate(args)

    def batch(self, step: int) -> list[tasks.Problem]:
        return self.train_set[step * self.args.batch:(step + 1) * self.args.batch]

    def evaluate(self, sampler: tunemesh.SamplingClient) -> tuple[float, list[str]]:
        replies = tasks.greedy_replies(sampler, self.renderer, self.eval_set, self.args.max_tokens,
                                       stop=self.rollouts.stop)
        return tasks.accuracy(self.task, self.eval_set, replies), replies

    def learn(self, groups: Sequence[Group]) -> dict[str, float]:
        """One optimizer step on the groups; the step's metrics."""
        sequences = [s for g in groups for s in g.sequences]
        row = {"reward": statistics.fmean(r for g in groups for r in g.rewards),
               "accuracy": statistics.fmean(c for g in groups for c in g.correct),
               "tokens": float(sum(len(s.tokens) for s in sequences))}
        data = step_datums(groups, self.args.loss, scale_by_std=not self.args.no_std)
        row["groups_used"] = float(len(data) // self.args.group_size)
        if data:
            output = policy_step(self.training, data, self.args.loss, self.lr)
            row["loss"] = output.metrics["loss:sum"]
            trained = [s for g, _ in groups_with_spread(groups, not self.args.no_std) for s in g.sequences]
            row.update(onpolicy_metrics(*sampled_logprobs(trained, output.loss_fn_outputs)))
        return row


def policy_step(training: tunemesh.TrainingClient, data: list[tunemesh.Datum], loss: str,
                lr: float) -> tunemesh.ForwardBackwardOutput:
    """forward_backward with the `--loss` choice, then an AdamW step (pipelined); the
    forward_backward's output (its loss, and the trainer's logprobs before the step)."""
    name, config = loss_config(loss)
    backward = training.forward_backward(data, name, config)
    step = training.optim_step(tunemesh.AdamParams(learning_rate=lr))
    output = backward.result()
    step.result()
    return output


def progress_fields(row: Mapping[str, float]) -> dict[str, str]:
    """A step's metrics for the progress bar: not the token count, and of the on-policy
    metrics only the largest |sampler lp - trainer lp|."""
    fields = {k: v for k, v in row.items() if k != "tokens" and not k.startswith("onpolicy/")}
    if "onpolicy/logprob_abs_diff_max" in row:
        fields["lp_diff"] = row["onpolicy/logprob_abs_diff_max"]
    return {k: f"{v:.3g}" for k, v in fields.items()}


def train(service: tunemesh.ServiceClient, args: argparse.Namespace, *, position: int = 0,
          log: common.MetricsLog | None = None) -> dict[str, Any]:
    """Run RL; return held-out accuracy before and after, an example and the log dir."""
    started = time.monotonic()
    run = _Run(service, args, log)
    bar = common.progress(args.steps, "rl", position)
    sampler = run.training.save_weights_and_get_sampling_client()
    accuracy_before, replies_before = run.evaluate(sampler)
    run.log.write(0, eval_accuracy=accuracy_before)
    bar.set_postfix(eval_acc=f"{accuracy_before:.2f}")
    pending = run.rollouts.start(sampler, run.batch(0), seed=args.seed)
    for step in range(args.steps):
        groups = run.rollouts.finish(pending)
        last = step + 1 == args.steps
        if args.off_policy and not last:  # sample t+1 from the pre-update weights while t trains
            sampler = sampler if step == 0 else run.training.save_weights_and_get_sampling_client()
            pending = run.rollouts.start(sampler, run.batch(step + 1), seed=args.seed + step + 1)
        row = run.learn(groups)
        if not args.off_policy and not last:
            sampler = run.training.save_weights_and_get_sampling_client()
            pending = run.rollouts.start(sampler, run.batch(step + 1), seed=args.seed + step + 1)
        if args.eval_every and (step + 1) % args.eval_every == 0 and not last:
            row["eval_accuracy"] = run.evaluate(run.training.save_weights_and_get_sampling_client())[0]
        run.log.write(step + 1, **row)
        bar.set_postfix(progress_fields(row))
        bar.update()
    accuracy_after, replies_after = run.evaluate(run.training.save_weights_and_get_sampling_client())
    run.log.write(args.steps, eval_accuracy=accuracy_after)
    bar.set_postfix(eval_acc=f"{accuracy_after:.2f}")
    bar.close()
    return _finish(run, accuracy_before, accuracy_after, replies_before, replies_after, time.monotonic() - started)


def example_index(task: tasks.Task, problems: Sequence[tasks.Problem], replies_before: Sequence[str]) -> int:
    """The held-out problem to show: the first one the model missed before training (chosen
    before the after-replies exist), else the first."""
    return next((i for i, (p, r) in enumerate(zip(problems, replies_before)) if not task.correct(p, r)), 0)


def _finish(run: _Run, accuracy_before: float, accuracy_after: float, replies_before: list[str],
            replies_after: list[str], seconds: float) -> dict[str, Any]:
    run.log.plot("loss", ["loss"], "RL: loss (per-token mean)")
    run.log.plot("reward", ["reward"], "RL: mean reward of the sampled groups")
    run.log.plot("accuracy", ["accuracy", "eval_accuracy"], "RL: sampled (train) and held-out greedy accuracy")
    shown = example_index(run.task, run.eval_set, replies_before)
    example = run.eval_set[shown]
    summary = {
        "recipe": "rl", "metric": "eval_accuracy", "task": run.task.name,
        "eval_accuracy_before": accuracy_before, "eval_accuracy_after": accuracy_after,
        "eval_size": len(run.eval_set),
        "train_reward_first": run.log.series("reward")[1][0] if run.log.series("reward")[1] else None,
        "train_reward_last": run.log.series("reward")[1][-1] if run.log.series("reward")[1] else None,
        "example": {"prompt": example.question, "answer": example.answer,
                    "before": replies_before[shown], "after": replies_after[shown]},
        "seconds": round(seconds, 1), "log_dir": str(run.log.directory),
    }
    common.write_summary(run.log.directory, summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_recipe(parser(), train, lambda s: [
        f"held-out greedy accuracy ({s['eval_size']} problems): {s['eval_accuracy_before']:.1%} -> "
        f"{s['eval_accuracy_after']:.1%}"], argv)


if __name__ == "__main__":
    sys.exit(main())
