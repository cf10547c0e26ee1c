"""RL recipe: group-relative advantages and the datums of one step."""

from __future__ import annotations

import pytest

import tunemesh
from cookbook import common, rl, tasks


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


class _Tokenizer:
    """Just enough of SmolLM2's tokenizer: ChatML specials and one token per line break."""

    unk_token_id, eos_token_id = 0, 2

    def convert_tokens_to_ids(self, token: str) -> int:
        return {"<|im_end|>": 2}.get(token, 0)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return {"\n": [198], "\n\n": [1116]}.get(text, [ord(c) for c in text])


def test_a_sampled_reply_stops_at_the_end_of_the_turn_or_a_line_break() -> None:
    assert rl.stop_tokens(common.Renderer(_Tokenizer())) == [2, 198, 1116]


def test_the_shown_example_is_the_first_held_out_problem_missed_before_training() -> None:
    task = tasks.Addition()
    problems = [tasks.Problem("What is 1 + 1?", "2"), tasks.Problem("What is 2 + 2?", "4"),
                tasks.Problem("What is 3 + 3?", "6")]
    assert rl.example_index(task, problems, ["1 + 1 = 2", "To add 2 and", "5"]) == 1
    assert rl.example_index(task, problems, ["2", "4", "6"]) == 0


def test_defaults_leave_room_for_an_equation_and_a_held_out_set_of_64() -> None:
    args = rl.parser().parse_args([])
    assert args.max_tokens >= 11  # "16 + 10 = 26" is 10 SmolLM2 tokens (a digit a token), then the stop
    assert args.eval_size >= 64 and args.group_size == 8
