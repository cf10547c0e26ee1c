"""Verifiable synthetic tasks: seeded problems and a reward a program can check.

A task makes `Problem`s (a question and its expected answer) and says whether a reply
solves one. `add` is small-number addition, graded by the last integer in the reply
(exact match). `number` asks for any number and is solved by a reply of digits only: a
random-init model already gets it right sometimes, so its reward has variance from the
first step (what RL on `tunemesh/tiny-dense` needs to learn anything).
"""

from __future__ import annotations

from collections.abc import Iterable

import dataclasses
import random
import re
from collections.abc import Sequence
from typing import Protocol

import tunemesh

from cookbook import common

_INTEGER = re.compile(r"-?\d+")
_WORDS = ("apple", "river", "stone", "cloud", "paper", "tiger", "lamp", "window", "garden", "bottle",
          "candle", "forest", "mirror", "pencil", "rocket", "silver", "turtle", "violin", "wagon", "zebra")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One question; `answer` is the expected reply ("" where any reply of the right form does)."""

    question: str
    answer: str

    def messages(self) -> list[dict[str, str]]:
        """The question as a one-turn chat."""
        return [{"role": "user", "content": self.question}]


class Task(Protocol):
    name: str

    def problem(self, rng: random.Random) -> Problem: ...

    def correct(self, problem: Problem, reply: str) -> bool: ...


@dataclasses.dataclass(frozen=True)
class Addition:
    """'What is a + b?' with 0 <= a, b <= max_operand; correct when the reply's last integer is a + b."""

    max_operand: int = 20
    name: str = "add"

    def problem(self, rng: random.Random) -> Problem:
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        return Problem(f"What is {a} + {b}?", str(a + b))

    def correct(self, problem: Problem, reply: str) -> bool:
        return parse_answer(reply) == problem.answer


@dataclasses.dataclass(frozen=True)
class AnyNumber:
    """'Reply with a number.' (plus a random word, so prompts differ: 20 distinct); correct when the reply is digits only."""

    name: str = "number"

    def problem(self, rng: random.Random) -> Problem:
        return Problem(f"Reply with a number. {rng.choice(_WORDS)}", "")

    def correct(self, problem: Problem, reply: str) -> bool:
        return reply.strip().isdigit()


TASKS: dict[str, Task] = {"add": Addition(), "number": AnyNumber()}


def task(name: str, max_operand: int | None = None) -> Task:
    """The task called `name` (`add` takes its largest operand)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    if name == "add" and max_operand is not None:
        return Addition(max_operand=max_operand)
    return TASKS[name]


def problems(task: Task, count: int, seed: int) -> list[Problem]:
    """`count` problems drawn with `seed` (the same seed gives the same problems)."""
    rng = random.Random(seed)
    return [task.problem(rng) for _ in range(count)]


def split(task: Task, train: int, held_out: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Training problems and `held_out` distinct held-out problems, none of whose questions are in training."""
    seen: set[str] = set()
    evaluation = _draw(task, random.Random(seed + 1_000_003), held_out, seen, "distinct held-out problems")
    training = _draw(task, random.Random(seed), train, frozenset(seen), "training problems outside the held-out set")
    return training, evaluation


def problems_outside(task: Task, count: int, seed: int, excluded: Iterable[Problem]) -> list[Problem]:
    """`count` problems drawn with `seed` whose questions are none of `excluded`'s (e.g.
    few-shot examples that must not hand a held-out answer to a teacher)."""
    questions = frozenset(problem.question for problem in excluded)
    return _draw(task, random.Random(seed), count, questions, "problems outside the excluded ones")


def _draw(task: Task, rng: random.Random, count: int, excluded: set[str] | frozenset[str], what: str) -> list[Problem]:
    """`count` problems whose questions are not in `excluded`; a mutable `excluded` also
    keeps them distinct (each drawn question joins it). ValueError when 50 draws per
    problem do not find enough."""
    drawn: list[Problem] = []
    for _ in range(count * 50):
        if len(drawn) == count:
            break
        candidate = task.problem(rng)
        if candidate.question not in excluded:
            drawn.append(candidate)
            if isinstance(excluded, set):
                excluded.add(candidate.question)
    if len(drawn) < count:
        raise ValueError(f"{task.name}: only {len(drawn)} {what}, {count} asked")
    return drawn


def parse_answer(reply: str) -> str | None:
    """The last integer in a reply (as written, without leading zeros), or None."""
    found = _INTEGER.findall(reply)
    return str(int(found[-1])) if found else None


def well_formed(reply: str) -> bool:
    """True when the reply is one integer and nothing else."""
    return _INTEGER.fullmatch(reply.strip()) is not None


def reward(task: Task, problem: Problem, reply: str, format_bonus: float = 0.0) -> float:
    """1 for a correct reply, 0 otherwise, plus `format_bonus` for a bare-integer reply."""
    return float(task.correct(problem, reply)) + (format_bonus if well_formed(reply) else 0.0)


def accuracy(task: Task, batch: Sequence[Problem], replies: Sequence[str]) -> float:
    """Fraction of replies that solve their problem."""
    if len(batch) != len(replies) or not batch:
        raise ValueError(f"{len(replies)} replies for {len(batch)} problems")
    return sum(task.correct(p, r) for p, r in zip(batch, replies)) / len(batch)


def greedy_replies(sampler: tunemesh.SamplingClient, renderer: common.Renderer, batch: Sequence[Problem],
                   max_tokens: int, context: Sequence[dict[str, str]] = (),
                   stop: Sequence[int] | None = None) -> list[str]:
    """Each problem's greedy reply from `sampler`, after the `context` messages if any (all in flight at
    once), ending at a token of `stop` (default: the end of the turn)."""
    params = tunemesh.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                     stop=renderer.stop if stop is None else list(stop))
    futures = [sampler.sample(tunemesh.ModelInput.from_ints(renderer.prompt([*context, *p.messages()])), 1, params)
               for p in batch]
    return [renderer.text(f.result().sequences[0].tokens) for f in futures]
