"""Loss functions by name: each maps one datum's logits and loss inputs to a loss.

A loss sees the datum's logits (N, V) and its loss inputs as tensors; it returns the
scalar loss plus per-datum outputs. New losses (importance_sampling, ppo, cispo, dro)
are one function and one `LOSSES` entry each.
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


@dataclasses.dataclass(frozen=True)
class LossDef:
    """A loss function and the loss inputs it needs (each (N,) or (N, K) like targets)."""

    fn: LossFn
    required_inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...] = ()


def gather_logprobs(logits_nv: torch.Tensor, target_tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[target] for targets (N,) or (N, K); same shape as targets."""
    logprobs_nv = torch.log_softmax(logits_nv, dim=-1)
    index_nk = target_tokens.reshape(target_tokens.shape[0], -1)
    return logprobs_nv.gather(-1, index_nk).reshape(target_tokens.shape)


def cross_entropy(
    logits_nv: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float | str],
) -> DatumLoss:
    """-sum(weights * logprobs[target]); weights default to 1 and may be any real numbers."""
    logprobs = gather_logprobs(logits_nv, inputs["target_tokens"])
    weights = inputs.get("weights")
    loss = -(logprobs.sum() if weights is None else (weights * logprobs).sum())
    return DatumLoss(loss=loss, outputs={"logprobs": logprobs})


LOSSES: dict[str, LossDef] = {
    "cross_entropy": LossDef(
        fn=cross_entropy, required_inputs=("target_tokens",), optional_inputs=("weights",)
    ),
}
