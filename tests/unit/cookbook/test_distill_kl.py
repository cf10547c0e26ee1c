"""Distillation recipe: reverse-KL advantages, the KL estimate and the teacher's context."""

from __future__ import annotations

import pytest

from cookbook import distill, tasks


def test_advantage_is_teacher_minus_student_logprob() -> None:
    assert distill.reverse_kl_advantages([-1.0, -0.2], [-0.5, -0.2]) == pytest.approx([-0.5, 0.0])
    with pytest.raises(ValueError):
        distill.reverse_kl_advantages([-1.0], [-1.0, -2.0])


def test_mean_reverse_kl_averages_over_all_tokens() -> None:
    scored = [([-1.0, -1.0], [-0.5, -0.5]), ([-2.0], [-0.5])]  # (teacher, student)
    assert distill.mean_reverse_kl(scored) == pytest.approx((0.5 + 0.5 + 1.5) / 3)
    with pytest.raises(ValueError):
        distill.mean_reverse_kl([([], [])])


def test_teacher_context_is_an_instruction_and_solved_examples() -> None:
    context = distill.teacher_context(tasks.Addition(), shots=2, seed=0)
    assert context[0] == {"role": "system", "content": distill.INSTRUCTION}
    assert [m["role"] for m in context[1:]] == ["user", "assistant", "user", "assistant"]
    question, answer = context[1]["content"], context[2]["content"]
    a, b = question.removeprefix("What is ").removesuffix("?").split(" + ")
    assert answer == str(int(a) + int(b))


def test_teacher_context_never_shows_a_held_out_problem() -> None:
    task = tasks.Addition()
    plain = distill.teacher_context(task, shots=3, seed=0)
    shown = [m["content"] for m in plain[1::2]]
    held_out = [p for p in tasks.problems(task, 3, seed=7_919) if p.question in shown[:2]]
    assert len(held_out) == 2  # the held-out set holds two of the examples the teacher would see
    context = distill.teacher_context(task, shots=3, seed=0, held_out=held_out)
    questions = [m["content"] for m in context[1::2]]
    assert len(questions) == 3 and not {p.question for p in held_out} & set(questions)
    assert distill.teacher_context(task, shots=3, seed=0, held_out=()) == plain
