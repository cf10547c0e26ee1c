"""On-policy distillation: the student samples, the teacher scores every sampled token.

The student is a LoRA run on the base model. Each step it samples completions of
training prompts with its current weights (the sampler's logprobs kept); the teacher
scores the same tokens with `compute_logprobs`, and every token's advantage is the
per-token reverse-KL term A_t = teacher lp_t - student lp_t, trained with the
`importance_sampling` loss (divided by the step's token count: a per-token mean).

The teacher is either the base model given a context the student never sees
(`--teacher base`, the default: context distillation of an instruction and a few solved
examples, "Reply with only the number.") or any checkpoint (`--teacher
tunemesh://...`), which by default sees the same prompt as the student.

Metric: per-token reverse KL(student || teacher) on held-out prompts (student samples
scored by both), before, during (`--eval-every`) and after; plus the task's greedy
exact-match accuracy on the same prompts, next to the teacher's own (the student learns
the teacher's behaviour, right or wrong: SmolLM2-135M with the few-shot context answers
with a bare number, often not the sum).

    python -m cookbook.distill --help
    python -m cookbook.distill --steps 6
    python -m cookbook.distill --teacher tunemesh://runs/.../sampler/... --context none
    python -m cookbook.distill --student-init tunemesh://runs/.../state/... --context none
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import tunemesh

from cookbook import common, tasks
from cookbook.rl import LOSSES, policy_step

INSTRUCTION = "Reply with only the number."


def parser() -> argparse.ArgumentParser:
    p = common.base_parser("On-policy distillation: the student samples, the teacher scores with compute_logprobs, "
                           "reverse-KL advantages; held-out KL before and after.", steps=12, batch=8, rank=16)
    p.add_argument("--teacher", default="base",
                   help="'base' (the base model, with --context) or a tunemesh:// sampler checkpoint path")
    p.add_argument("--context", default=None, choices=("fewshot", "none"),
                   help="what the teacher sees before the question (default: fewshot for base, none for a checkpoint)")
    p.add_argument("--student-init", default=None,
                   help="start the student from this state checkpoint (tunemesh://runs/.../state/...) instead of the base")
    p.add_argument("--shots", type=int, default=3, help="solved examples in the teacher's few-shot context")
    p.add_argument("--task", default="add", choices=sorted(tasks.TASKS), help="where the prompts come from")
    p.add_argument("--max-operand", type=int, default=20, help="largest operand of an addition")
    p.add_argument("--samples", type=int, default=2, help="student completions per prompt")
    p.add_argument("--max-tokens", type=int, default=12, help="longest sampled reply")
    p.add_argument("--loss", default="importance_sampling", choices=LOSSES, help="policy-gradient loss")
    p.add_argument("--eval-size", type=int, default=16, help="held-out prompts")
    p.add_argument("--eval-every", type=int, default=0, help="held-out KL every this many steps (0: before/after)")
    # Half the SFT helper's rate: on SmolLM2 at 1e-3 the student overshoots into bare wrong numbers
    # (held-out KL 0.79 -> 0.37, accuracy 25% -> 0%); at 5e-4 KL 0.79 -> 0.20, accuracy = the teacher's.
    p.set_defaults(lr=5e-4)
    return p


def teacher_context(task: tasks.Task, shots: int, seed: int,
                    held_out: Sequence[tasks.Problem] = ()) -> list[dict[str, str]]:
    """The instruction as a system message and `shots` solved problems as earlier turns,
    none of them a `held_out` problem (the teacher would see its answer)."""
    messages = [{"role": "system", "content": INSTRUCTION}]
    for problem in tasks.problems_outside(task, shots, seed + 7_919, held_out):
        messages += [{"role": "user", "content": problem.question}, {"role": "assistant", "content": problem.answer}]
    return messages


def reverse_kl_advantages(teacher_logprobs: Sequence[float], student_logprobs: Sequence[float]) -> list[float]:
    """A_t = teacher lp_t - student lp_t: minus the per-token reverse-KL term of each sampled token."""
    if len(teacher_logprobs) != len(student_logprobs):
        raise ValueError(f"{len(teacher_logprobs)} teacher logprobs for {len(student_logprobs)} student ones")
    return [t - s for t, s in zip(teacher_logprobs, student_logprobs)]


def mean_reverse_kl(scored: Sequence[tuple[Sequence[float], Sequence[float]]]) -> float:
    """Per-token reverse KL estimate over (teacher lps, student lps) of student samples."""
    terms = [s - t for teacher, student in scored for t, s in zip(teacher, student)]
    if not terms:
        raise ValueError("no sampled tokens to average over")
    return statistics.fmean(terms)


@dataclasses.dataclass
class Scored:
    """One student completion with the teacher's logprobs of its tokens."""

    prompt: list[int]
    sequence: tunemesh.SampledSequence
    teacher_logprobs: list[float]


class _Run:
    """One distillation run: prompts, student and teacher clients, metrics."""

    def __init__(self, service: tunemesh.ServiceClient, args: argparse.Namespace,
                 log: common.MetricsLog | None) -> None:
        self.args = args
        self.task = tasks.task(args.task, args.max_operand)
        self.train_set, self.eval_set = tasks.split(self.task, args.steps * args.batch, args.eval_size, args.seed)
        if args.student_init:
            self.training = service.create_training_client_from_state(args.student_init)
        else:
            self.training = service.create_lora_training_client(args.model, rank=args.rank, seed=args.seed)
        self.renderer = common.Renderer(self.training.get_tokenizer())
        if args.teacher == "base":
            self.teacher = service.create_sampling_client(base_model=args.model)
        else:
            self.teacher = service.create_sampling_client(model_path=args.teacher)
        context = args.context or ("fewshot" if args.teacher == "base" else "none")
        self.context = (teacher_context(self.task, args.shots, args.seed, self.eval_set) if context == "fewshot"
                        else [])
        self.log = log or common.MetricsLog(common.log_dir(args, "distill"))
        self.lr = common.learning_rate(args)

    def rollouts(self, sampler: tunemesh.SamplingClient, batch: Sequence[tasks.Problem], samples: int,
                 seed: int) -> list[Scored]:
        """Student samples of each problem, each scored by the teacher (all requests in flight at once)."""
        sampled = []
        for i, problem in enumerate(batch):
            params = tunemesh.SamplingParams(max_tokens=self.args.max_tokens, temperature=1.0,
                                             stop=self.renderer.stop, seed=seed * 1000 + i)
            prompt = self.renderer.prompt(problem.messages())
            sampled.append((problem, prompt, sampler.sample(tunemesh.ModelInput.from_ints(prompt), samples, params)))
        scoring = []
        for problem, prompt, future in sampled:
            teacher_prompt = self.renderer.prompt([*self.context, *problem.messages()])
            for sequence in future.result().sequences:
                full = tunemesh.ModelInput.from_ints(teacher_prompt + list(sequence.tokens))
                scoring.append((prompt, sequence, len(teacher_prompt), self.teacher.compute_logprobs(full)))
        return [Scored(prompt, sequence, [float(x) for x in logprobs.result()[start:]])
                for prompt, sequence, start, logprobs in scoring]

    def evaluate(self, sampler: tunemesh.SamplingClient) -> tuple[float, float, list[str]]:
        """Held-out per-token reverse KL (seeded student samples), greedy accuracy, greedy replies."""
        scored = self.rollouts(sampler, self.eval_set, 1, seed=10_000 + self.args.seed)
        kl = mean_reverse_kl([(s.teacher_logprobs, s.sequence.logprobs) for s in scored])
        replies = tasks.greedy_replies(sampler, self.renderer, self.eval_set, self.args.max_tokens)
        return kl, tasks.accuracy(self.task, self.eval_set, replies), replies

    def learn(self, scored: Sequence[Scored]) -> dict[str, float]:
        """One optimizer step on reverse-KL advantages; the step's metrics."""
        tokens = sum(len(s.sequence.tokens) for s in scored)
        data = []
        for s in scored:
            advantages = [a / tokens for a in reverse_kl_advantages(s.teacher_logprobs, s.sequence.logprobs)]
            if self.args.loss == "reinforce":
                data.append(common.datum(s.prompt, s.sequence.tokens, weights=advantages))
            else:
                data.append(common.datum(s.prompt, s.sequence.tokens, logprobs=s.sequence.logprobs,
                                         advantages=advantages))
        loss = policy_step(self.training, data, self.args.loss, self.lr).metrics["loss:sum"]
        return {"reverse_kl": mean_reverse_kl([(s.teacher_logprobs, s.sequence.logprobs) for s in scored]),
                "loss": loss, "tokens": float(tokens)}


def train(service: tunemesh.ServiceClient, args: argparse.Namespace, *, position: int = 0,
          log: common.MetricsLog | None = None) -> dict[str, Any]:
    """Run distillation; return held-out reverse KL and accuracy before and after, and the log dir."""
    started = time.monotonic()
    run = _Run(service, args, log)
    bar = common.progress(args.steps, "distill", position)
    sampler = run.training.save_weights_and_get_sampling_client()
    kl_before, accuracy_before, replies_before = run.evaluate(sampler)
    teacher_replies = tasks.greedy_replies(run.teacher, run.renderer, run.eval_set, args.max_tokens, run.context)
    teacher_accuracy = tasks.accuracy(run.task, run.eval_set, teacher_replies)
    run.log.write(0, eval_kl=kl_before, eval_accuracy=accuracy_before, teacher_accuracy=teacher_accuracy)
    bar.set_postfix(eval_kl=f"{kl_before:.3f}")
    for step in range(args.steps):
        batch = run.train_set[step * args.batch:(step + 1) * args.batch]
        row = run.learn(run.rollouts(sampler, batch, args.samples, seed=args.seed + step))
        sampler = run.training.save_weights_and_get_sampling_client()
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            row["eval_kl"], row["eval_accuracy"], _ = run.evaluate(sampler)
        run.log.write(step + 1, **row)
        bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k != "tokens"})
        bar.update()
    kl_after, accuracy_after, replies_after = run.evaluate(sampler)
    run.log.write(args.steps, eval_kl=kl_after, eval_accuracy=accuracy_after)
    bar.set_postfix(eval_kl=f"{kl_after:.3f}")
    bar.close()
    summary = {"eval_kl_before": kl_before, "eval_kl_after": kl_after,
               "eval_accuracy_before": accuracy_before, "eval_accuracy_after": accuracy_after,
               "teacher_accuracy": teacher_accuracy}
    return _finish(run, summary, replies_before, replies_after, time.monotonic() - started)


def _finish(run: _Run, summary: dict[str, Any], replies_before: list[str], replies_after: list[str],
            seconds: float) -> dict[str, Any]:
    run.log.plot("loss", ["loss"], "distill: loss (per-token mean)")
    run.log.plot("kl", ["reverse_kl", "eval_kl"], "distill: per-token reverse KL(student || teacher)")
    run.log.plot("accuracy", ["eval_accuracy", "teacher_accuracy"], "distill: held-out greedy accuracy")
    example = run.eval_set[0]
    summary = {"recipe": "distill", "metric": "eval_kl", "teacher": run.args.teacher, **summary,
               "example": {"prompt": example.question, "answer": example.answer,
                           "before": replies_before[0], "after": replies_after[0]},
               "seconds": round(seconds, 1), "log_dir": str(run.log.directory)}
    common.write_summary(run.log.directory, summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_recipe(parser(), train, lambda s: [
        f"held-out reverse KL per token: {s['eval_kl_before']:.3f} -> {s['eval_kl_after']:.3f}",
        f"held-out greedy accuracy:      {s['eval_accuracy_before']:.1%} -> {s['eval_accuracy_after']:.1%} "
        f"(teacher, with its context: {s['teacher_accuracy']:.1%})"], argv)


if __name__ == "__main__":
    sys.exit(main())
