"""The LoRA learning-rate helper: the documented formula and its errors."""

from __future__ import annotations

import pytest

import tunemesh


def test_smollm2_figures_match_the_documented_sweep_points():
    lr = tunemesh.lora_learning_rate
    assert lr("HuggingFaceTB/SmolLM2-135M-Instruct", 32) == pytest.approx(1e-3)  # measured best 1e-3
    assert lr("HuggingFaceTB/SmolLM2-135M-Instruct", 4) == pytest.approx(2.83e-3, rel=1e-3)  # measured best 3e-3
    assert lr("HuggingFaceTB/SmolLM2-135M-Instruct", 16) == pytest.approx(1.414e-3, rel=1e-3)


def test_fixed_alpha_makes_the_rate_rank_independent_and_width_scales_it_down():
    lr = tunemesh.lora_learning_rate
    assert lr(576, 8, alpha=32) == lr(576, 128, alpha=32)
    assert lr(4096, 32) == pytest.approx(lr(576, 32) * 576 / 4096)
    assert lr("tunemesh/tiny-dense", 16) == pytest.approx(1.27e-2, rel=1e-2)


@pytest.mark.parametrize(("model", "rank", "alpha", "error"), [
    ("some/unknown-model", 8, None, ValueError), (0, 8, None, ValueError), (576, 0, None, ValueError),
    (576, 8, -1.0, ValueError), (None, 8, None, TypeError), (True, 8, None, TypeError)])
def test_bad_arguments_are_refused(model, rank, alpha, error):
    with pytest.raises(error):
        tunemesh.lora_learning_rate(model, rank, alpha)
