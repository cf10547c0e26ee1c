"""Synthetic tasks: seeded problems, held-out split, answer parsing and rewards."""

from __future__ import annotations

import pytest

from cookbook import tasks


def test_parse_answer_takes_the_last_integer() -> None:
    assert tasks.parse_answer("3 + 4 = 7") == "7"
    assert tasks.parse_answer("The answer is 12.") == "12"
    assert tasks.parse_answer("-5") == "-5"
    assert tasks.parse_answer("007") == "7"
    assert tasks.parse_answer("no digits here") is None


def test_well_formed_is_a_bare_integer() -> None:
    assert tasks.well_formed(" 42 ")
    assert not tasks.well_formed("42.")
    assert not tasks.well_formed("The answer is 42")
    assert not tasks.well_formed("")


def test_addition_problems_are_correct_sums_within_range() -> None:
    task = tasks.Addition(max_operand=5)
    for problem in tasks.problems(task, 50, seed=1):
        a, b = (int(x) for x in problem.question.removeprefix("What is ").removesuffix("?").split(" + "))
        assert 0 <= a <= 5 and 0 <= b <= 5 and problem.answer == str(a + b)


def test_problems_are_seeded() -> None:
    task = tasks.task("add")
    assert tasks.problems(task, 10, seed=3) == tasks.problems(task, 10, seed=3)
    assert tasks.problems(task, 10, seed=3) != tasks.problems(task, 10, seed=4)


def test_split_keeps_held_out_questions_out_of_training() -> None:
    task = tasks.Addition(max_operand=9)
    training, held_out = tasks.split(task, 200, 20, seed=0)
    assert len(training) == 200 and len(held_out) == 20
    assert not {p.question for p in training} & {p.question for p in held_out}


def test_held_out_problems_are_distinct_and_the_split_refuses_an_impossible_size() -> None:
    _, held_out = tasks.split(tasks.Addition(max_operand=20), 64, 64, seed=0)
    assert len({p.question for p in held_out}) == 64
    with pytest.raises(ValueError, match="distinct held-out"):
        tasks.split(tasks.Addition(max_operand=2), 4, 10, seed=0)  # only 9 questions exist
    with pytest.raises(ValueError, match="training problems"):
        tasks.split(tasks.Addition(max_operand=2), 4, 9, seed=0)  # nothing left to train on


def test_an_equation_reply_is_graded_by_its_result() -> None:
    task, problem = tasks.Addition(), tasks.Problem("What is 16 + 10?", "26")
    assert task.correct(problem, "16 + 10 = 26") and task.correct(problem, "16 + 10 equals 26.")
    assert not task.correct(problem, "16 + 10 =")  # cut before the result: its last integer is an operand
    assert not task.correct(problem, "16 + 10 = 16")


def test_reward_is_exact_match_plus_format_bonus() -> None:
    task = tasks.Addition()
    problem = tasks.Problem("What is 2 + 3?", "5")
    assert tasks.reward(task, problem, "2 + 3 = 5") == 1.0
    assert tasks.reward(task, problem, "5", format_bonus=0.1) == pytest.approx(1.1)
    assert tasks.reward(task, problem, "6", format_bonus=0.1) == pytest.approx(0.1)
    assert tasks.reward(task, problem, "To add 2 and 3, we") == 0.0


def test_any_number_accepts_digits_only() -> None:
    task = tasks.task("number")
    problem = task.problem(__import__("random").Random(0))
    assert problem.question.startswith("Reply with a number.")
    assert task.correct(problem, "1234") and not task.correct(problem, "12a") and not task.correct(problem, "")


def test_accuracy_counts_correct_replies_and_rejects_mismatched_lengths() -> None:
    task = tasks.Addition()
    batch = [tasks.Problem("What is 1 + 1?", "2"), tasks.Problem("What is 2 + 2?", "4")]
    assert tasks.accuracy(task, batch, ["2", "5"]) == 0.5
    with pytest.raises(ValueError):
        tasks.accuracy(task, batch, ["2"])


def test_unknown_task_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        tasks.task("chess")
