"""The DPO recipe's generated preference pairs."""

from __future__ import annotations

import random

from cookbook import dpo


def test_chosen_is_the_correct_number_and_rejected_rambles() -> None:
    wrong = 0
    for pair in dpo.make_pairs(300, random.Random(1)):
        a, b = (int(w.strip("?.")) for w in pair.question.split() if w.strip("?.").isdigit())
        correct = {a + b, a - b, b - a, a * b}  # "Subtract b from a" names b first
        assert int(pair.chosen) in correct
        assert len(pair.rejected) > 3 * len(pair.chosen)
        shown = int(pair.rejected.split("So the answer is ")[1].split(".")[0])
        wrong += shown != int(pair.chosen)
    assert 100 < wrong < 200  # about half the rejected replies give a wrong result


def test_split_is_seeded_and_held_out_questions_are_unseen() -> None:
    train, held_out = dpo.split(seed=2, train_size=64, eval_size=32)
    assert (train, held_out) == dpo.split(seed=2, train_size=64, eval_size=32)
    assert len(train) == 64 and len(held_out) == 32
    assert not {p.question for p in train} & {p.question for p in held_out}
