"""Incremental stop strings against the whole-text check they replace: on random token
streams of the tiny model's tokenizer (byte-level, so multi-byte characters split across
tokens), with stops cut out of the streams' own text, both stop at the same token and keep
the same tokens; and the per-step check decodes a bounded window, not the whole row."""

from __future__ import annotations

import random

import pytest

from tunemesh_sampler.engine.stop_strings import StopStrings


@pytest.fixture(scope="module")
def detokenize(model_dir):
    from tunemesh_sampler.engine.torch_engine import load_detokenizer

    return load_detokenizer(model_dir)


def _whole_text_cut(tokens: list[int], stops: list[str], detokenize) -> int | None:
    """The old check: the whole text each step; keep the tokens before the first token
    whose prefix text holds a stop."""
    def holds(k: int) -> bool:
        return any(s in detokenize(tokens[:k]) for s in stops)

    if not holds(len(tokens)):
        return None
    return next(k for k in range(1, len(tokens) + 1) if holds(k)) - 1


def _first_stop(stream: list[int], check) -> tuple[int, int] | None:
    """(step, tokens kept) where `check` first stops the growing stream."""
    for step in range(1, len(stream) + 1):
        keep = check(stream[:step])
        if keep is not None:
            return step, keep
    return None


def test_same_stop_and_cut_as_the_whole_text_check(detokenize, model_dir):
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(model_dir).vocab_size
    rng = random.Random(7)
    stopped = 0
    for case in range(60):
        stream = [rng.randrange(vocab) for _ in range(rng.randrange(5, 60))]
        text = detokenize(stream)
        start = rng.randrange(len(text))
        stops = [text[start : start + rng.randrange(1, 6)].replace("\ufffd", "") or "x", "ü", "\n\n"]
        got = _first_stop(stream, StopStrings(stops, detokenize).cut)
        want = _first_stop(stream, lambda tokens: _whole_text_cut(tokens, stops, detokenize))
        assert got == want, (case, stops)
        stopped += want is not None
    assert stopped >= 40  # most streams hold their stop: the comparison is not vacuous


def test_per_step_check_decodes_a_bounded_window(detokenize):
    lengths: list[int] = []

    def counting(tokens: list[int]) -> str:
        lengths.append(len(tokens))
        return detokenize(tokens)

    stops = StopStrings(["never appears \u2603"], counting)
    tokens = list(range(40, 440))
    for step in range(1, len(tokens) + 1):
        assert stops.cut(tokens[:step]) is None
    assert max(lengths) == 4 * len("never appears \u2603") + 8


def test_no_stops():
    assert not StopStrings(["", ""], lambda tokens: "")
    assert StopStrings([], lambda tokens: "abc").cut([1, 2]) is None
