"""RL recipe: group-relative advantages and the datums of one step."""

from __future__ import annotations

import pytest

import tunemesh
from cookbook import rl, tasks


def test_advantages_are_centred_and_scaled_by_the_group_std() -> None:
    advantages = rl.group_advantages([1.0, 0.0, 0.0, 0.0])
    assert sum(advantages) == pytest.approx(0.0)
    assert advantages[0] == pytest.approx(0.75 / 0.4330127)
    assert rl.group_advantages([1.0, 0.0], scale_by_std=False) == [0.5, -0.5]


def test_a_group_with_equal_rewards_has_no_advantage() -> None:
    assert rl.group_advantages([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        rl.group_advantages([])


def _group(rewards: list[float], lengths: list[int]) -> rl.Group:
    sequences = [tunemesh.SampledSequence([7] * n, [-0.5] * n, "stop") for n in lengths]
    return rl.Group(tasks.Problem("q", "a"), [1, 2, 3], sequences, rewards, [r > 0 for r in rewards])


def test_step_datums_skip_flat_groups_and_average_over_the_step_tokens() -> None:
    groups = [_group([1.0, 0.0], [2, 3]), _group([0.0, 0.0], [4, 4])]
    data = rl.step_datums(groups, "importance_sampling", scale_by_std=False)
    assert len(data) == 2  # the flat group teaches nothing
    first = data[0].loss_fn_inputs
    assert first["target_tokens"].tolist() == [2, 3, 7, 7]
    assert first["advantages"].tolist() == pytest.approx([0.0, 0.0, 0.5 / 5, 0.5 / 5])
    assert first["logprobs"].tolist() == pytest.approx([0.0, 0.0, -0.5, -0.5])
    assert data[1].loss_fn_inputs["advantages"].tolist()[2:] == pytest.approx([-0.5 / 5] * 3)


def test_reinforce_puts_the_advantages_into_cross_entropy_weights() -> None:
    data = rl.step_datums([_group([1.0, 0.0], [1, 1])], "reinforce", scale_by_std=False)
    assert set(data[0].loss_fn_inputs) == {"target_tokens", "weights"}
    assert data[0].loss_fn_inputs["weights"].tolist() == pytest.approx([0.0, 0.0, 0.25])
    assert rl.loss_config("reinforce") == ("cross_entropy", None)
    assert rl.loss_config("dro") == ("dro", {"beta": rl.DRO_BETA})
    assert rl.loss_config("ppo") == ("ppo", None)


def test_no_datums_when_every_group_is_flat() -> None:
    assert rl.step_datums([_group([1.0, 1.0], [2, 2])], "importance_sampling") == []
