"""The SFT recipe's generated extraction task and its evaluation arithmetic."""

from __future__ import annotations

import random
import re

import pytest

from cookbook import sft


def test_split_is_seeded_and_holds_out_names() -> None:
    train, held_out = sft.split(seed=3, train_size=64, eval_size=16)
    assert (train, held_out) == sft.split(seed=3, train_size=64, eval_size=16)
    assert sft.split(seed=4, train_size=64, eval_size=16)[0] != train
    assert len(train) == 64 and len(held_out) == 16
    train_names = {e.answer.split(", ")[0] for e in train}
    held_out_names = {e.answer.split(", ")[0] for e in held_out}
    assert held_out_names and not train_names & held_out_names


def test_answer_is_the_name_and_age_found_in_the_sentence() -> None:
    for example in sft.make_examples(200, sft.NAMES, random.Random(0)):
        name, age = example.answer.split(", ")
        assert re.search(rf"\b{name}\b", example.text)
        assert re.search(rf"\b{age}\b", example.text) and 18 <= int(age) <= 89
        assert example.text in example.messages()[0]["content"]


def test_exact_match_ignores_surrounding_whitespace_only() -> None:
    assert sft.exact_match(" Maria, 34\n", "Maria, 34")
    assert not sft.exact_match("Maria,34", "Maria, 34")
    assert not sft.exact_match("Name: Maria, Age: 34", "Maria, 34")


def test_per_token_nll_divides_the_summed_loss_by_answer_tokens() -> None:
    assert sft.per_token_nll(12.0, 4.0) == 3.0
    with pytest.raises(ValueError):
        sft.per_token_nll(1.0, 0.0)
