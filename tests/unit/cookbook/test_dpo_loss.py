"""The DPO recipe's loss against a hand computation, and its pair data."""

from __future__ import annotations

import math

import pytest
import torch

from cookbook import dpo


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_loss_fn_matches_a_hand_computation_and_its_gradient() -> None:
    pairs = [dpo.TokenPair([1, 2, 3], [4, 5], [6, 7, 8], ref_chosen=-3.0, ref_rejected=-4.0),
             dpo.TokenPair([1, 2], [9], [10, 11], ref_chosen=-1.0, ref_rejected=-2.5)]
    data = [d for p in pairs for d in p.data()]
    # per-position learner logprobs; prompt positions hold values the loss must ignore
    values = [[-9.0, -9.0, -1.0, -1.5], [-9.0, -9.0, -2.0, -1.0, -0.5],
              [-9.0, -0.25], [-9.0, -1.0, -1.0]]
    logprobs = [torch.tensor(v, dtype=torch.float32, requires_grad=True) for v in values]
    loss, metrics = dpo.DpoLossFn(pairs, beta=0.5)(data, logprobs)
    m1 = 0.5 * ((-2.5 - -3.0) - (-3.5 - -4.0))   # 0.0
    m2 = 0.5 * ((-0.25 - -1.0) - (-2.0 - -2.5))  # 0.125
    expected = (-math.log(_sigmoid(m1)) - math.log(_sigmoid(m2))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["accuracy"] == 0.5 and metrics["margin"] == pytest.approx((m1 + m2) / 2)
    loss.backward()
    g1 = -0.5 * _sigmoid(-m1) / 2  # d loss / d logprob of one chosen token of pair 1
    assert logprobs[0].grad.tolist() == pytest.approx([0.0, 0.0, g1, g1])
    assert logprobs[1].grad.tolist() == pytest.approx([0.0, 0.0, -g1, -g1, -g1])
    assert logprobs[2].grad.tolist() == pytest.approx([0.0, -0.5 * _sigmoid(-m2) / 2])


def test_loss_fn_rejects_data_that_does_not_match_its_pairs() -> None:
    pair = dpo.TokenPair([1, 2], [3], [4], ref_chosen=-1.0, ref_rejected=-1.0)
    with pytest.raises(ValueError):
        dpo.DpoLossFn([pair, pair], beta=0.1)(pair.data(), [torch.zeros(2), torch.zeros(2)])


def test_summarize_margins() -> None:
    values = (0.0, 1.0, -0.5, 2.0, 5e-5)
    summary = dpo.summarize_margins(values)
    assert summary["eval_accuracy"] == 0.4  # a zero margin, or one within noise of it, is no preference
    assert summary["eval_margin"] == pytest.approx(sum(values) / 5)
    expected = sum(-math.log(_sigmoid(m)) for m in values) / 5
    assert summary["eval_loss"] == pytest.approx(expected)


def test_reply_logprob_sums_the_reply_positions_of_compute_logprobs() -> None:
    assert dpo.reply_logprob([None, -1.0, -2.0, -0.5, -0.25], 2) == -0.75
    with pytest.raises(ValueError):
        dpo.reply_logprob([None, -1.0], 2)


def test_pair_data_score_the_replies_only() -> None:
    pair = dpo.TokenPair([1, 2, 3], [4, 5], [6], ref_chosen=0.0, ref_rejected=0.0)
    chosen, rejected = pair.data()
    assert chosen.loss_fn_inputs["weights"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert chosen.loss_fn_inputs["target_tokens"].tolist() == [2, 3, 4, 5]
    assert rejected.loss_fn_inputs["target_tokens"].tolist() == [2, 3, 6]
