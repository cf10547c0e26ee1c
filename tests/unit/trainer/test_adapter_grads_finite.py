"""An adapter's fresh gradients are finite exactly when every element is: a fast 2-norm
screen passes the common case, and only the max norm may refuse a gradient (a 2-norm
overflows on huge finite values)."""

from __future__ import annotations

import pytest
import torch

from tunemesh_trainer.domain import LoraSpec
from tunemesh_trainer.engine.adapter import AdapterSlot


def _slot_with_grad(value: float) -> AdapterSlot:
    slot = AdapterSlot(LoraSpec(rank=4, alpha=4.0), {"q_proj": (576, 576), "v_proj": (576, 192)}, torch.device("cpu"))
    for param in slot.params:
        param.grad = torch.zeros_like(param)
    slot.params[-1].grad[:, 0] = value  # a whole column: its 2-norm overflows for 3e38
    return slot


@pytest.mark.parametrize(("value", "finite"), [(1.0, True), (3e38, True), (float("inf"), False),
                                               (float("-inf"), False), (float("nan"), False)])
def test_fresh_grads_are_finite_exactly_when_every_element_is(value, finite):
    slot = _slot_with_grad(value)
    assert bool(torch.isfinite(torch.linalg.vector_norm(slot.params[-1].grad))) == (value == 1.0)  # the screen's view
    assert slot.fresh_grads_finite() is finite
