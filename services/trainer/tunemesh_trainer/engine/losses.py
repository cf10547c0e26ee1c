"""Loss functions by name: each maps one datum's target logprobs and loss inputs to a loss.

The engine computes every datum's target logprobs (N,) or (N, K) in one pass over the
fused batch (`target_logprobs`); a loss sees them and the datum's loss inputs as tensors
and returns the scalar loss plus per-datum outputs. Every Tinker loss (cross_entropy,
importance_sampling, ppo, cispo, dro) is a function of target logprobs, so each new one
is one function and one `LOSSES` entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch


@dataclasses.dataclass
class DatumLoss:
    """One datum's scalar loss and its outputs (e.g. `logprobs`, same shape as targets)."""

    loss: torch.Tensor
    outputs: dict[str, torch.Tensor]


LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, float | str]], DatumLoss]


def target_logprobs(logits_btv: torch.Tensor, targets_btk: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[target] for every row, position and target slot: (B, T, K)."""
    return torch.log_softmax(logits_btv, dim=-1).gather(-1, targets_btk)


@dataclasses.dataclass(frozen=True)
class LossDef:
    """A loss function and the loss inputs it needs (each (N,) or (N, K) like targets)."""

    fn: LossFn
    required_inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...] = ()


def cross_entropy(
    logprobs: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float | str],
) -> DatumLoss:
    """-sum(weights * logprobs[target]); weights default to 1 and may be any real numbers."""
    weights = inputs.get("weights")
    loss = -(logprobs.sum() if weights is None else (weights * logprobs).sum())
    return DatumLoss(loss=loss, outputs={"logprobs": logprobs})


LOSSES: dict[str, LossDef] = {
    "cross_entropy": LossDef(
        fn=cross_entropy, required_inputs=("target_tokens",), optional_inputs=("weights",)
    ),
}
