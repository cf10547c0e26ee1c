"""RL recipe: on-policy metrics, sampler vs trainer logprobs of the sampled tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tunemesh

from cookbook import common, rl, tasks


def test_equal_logprobs_give_no_difference_and_a_ratio_of_exactly_one() -> None:
    logprobs = np.array([-0.1, -2.5, -7.25, 0.0], dtype=np.float32)
    metrics = rl.onpolicy_metrics(logprobs, logprobs.copy())
    assert metrics == {"onpolicy/logprob_abs_diff_mean": 0.0, "onpolicy/logprob_abs_diff_max": 0.0,
                       "onpolicy/ratio_mean": 1.0, "onpolicy/ratio_min": 1.0, "onpolicy/ratio_max": 1.0}


def test_differences_and_ratios_are_trainer_minus_sampler() -> None:
    sampler = np.array([-1.0, -2.0, -3.0, -0.5])
    trainer = np.array([-1.5, -2.0, -2.0, -0.5])  # differences -0.5, 0, +1, 0
    metrics = rl.onpolicy_metrics(sampler, trainer)
    assert metrics["onpolicy/logprob_abs_diff_mean"] == pytest.approx(1.5 / 4)
    assert metrics["onpolicy/logprob_abs_diff_max"] == pytest.approx(1.0)
    assert metrics["onpolicy/ratio_mean"] == pytest.approx((math.exp(-0.5) + 1 + math.e + 1) / 4)
    assert metrics["onpolicy/ratio_min"] == pytest.approx(math.exp(-0.5))
    assert metrics["onpolicy/ratio_max"] == pytest.approx(math.e)


def test_metrics_refuse_misaligned_or_empty_logprobs() -> None:
    with pytest.raises(ValueError):
        rl.onpolicy_metrics(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError):
        rl.onpolicy_metrics(np.zeros(0), np.zeros(0))


def _sequence(logprobs: list[float]) -> tunemesh.SampledSequence:
    return tunemesh.SampledSequence([7] * len(logprobs), logprobs, "stop")


def _trainer_output(prompt: list[int], completion_lp: list[float]) -> dict[str, tunemesh.TensorData]:
    """What the trainer returns for a datum: a logprob per target position, the prompt's first
    (set far off here, so counting one would show)."""
    prompt_lp = [-50.0] * (len(prompt) - 1)
    return {"logprobs": tunemesh.TensorData(prompt_lp + completion_lp, "float32")}


def test_only_the_completion_tokens_of_each_datum_are_compared() -> None:
    prompt = [1, 2, 3]
    sequences = [_sequence([-0.5, -1.0]), _sequence([-2.0])]
    data = [common.datum(prompt, s.tokens, logprobs=s.logprobs, advantages=1.0) for s in sequences]
    outputs = [_trainer_output(prompt, [-0.5, -1.0]), _trainer_output(prompt, [-3.0])]
    assert [len(o["logprobs"].data) for o in outputs] == [len(d.loss_fn_inputs["target_tokens"].data) for d in data]
    sampler, trainer = rl.sampled_logprobs(sequences, outputs)
    assert sampler.tolist() == [-0.5, -1.0, -2.0]
    assert trainer.tolist() == [-0.5, -1.0, -3.0]
    metrics = rl.onpolicy_metrics(sampler, trainer)
    assert metrics["onpolicy/logprob_abs_diff_max"] == pytest.approx(1.0)
    assert metrics["onpolicy/logprob_abs_diff_mean"] == pytest.approx(1.0 / 3)
    with pytest.raises(ValueError):
        rl.sampled_logprobs(sequences, outputs[:1])


def test_the_compared_sequences_are_those_of_the_step_datums_in_order() -> None:
    sequences = [[_sequence([-0.5]), _sequence([-1.0])], [_sequence([-2.0]), _sequence([-3.0])],
                 [_sequence([-4.0]), _sequence([-5.0])]]
    groups = [rl.Group(tasks.Problem("q", "a"), [1, 2], s, r, [x > 0 for x in r])
              for s, r in zip(sequences, ([1.0, 0.0], [1.0, 1.0], [0.0, 1.0]))]
    kept = [s for g, _ in rl.groups_with_spread(groups) for s in g.sequences]
    data = rl.step_datums(groups, "importance_sampling")
    assert [s.logprobs[0] for s in kept] == [-0.5, -1.0, -4.0, -5.0]
    assert [d.loss_fn_inputs["logprobs"].tolist()[-1] for d in data] == [-0.5, -1.0, -4.0, -5.0]


def test_the_progress_bar_shows_only_the_largest_logprob_difference() -> None:
    row = {"reward": 0.5, "tokens": 40.0, "loss": 0.25,
           **rl.onpolicy_metrics(np.array([-1.0, -2.0]), np.array([-1.0, -2.5]))}
    assert rl.progress_fields(row) == {"reward": "0.5", "loss": "0.25", "lp_diff": "0.5"}
