"""Loss functions by name: each maps one datum's target logprobs and loss inputs to a loss.

The engine computes every datum's target logprobs (N,) or (N, K) in one pass over the
fused batch (`target_logprobs`); a loss sees them and the datum's loss inputs as tensors
and returns the scalar loss plus per-datum outputs. Tinker's losses (cross_entropy,
importance_sampling, ppo, cispo, dro, gspo) are functions of target logprobs, so each new
one is one function and one `LOSSES` entry; names, inputs and config defaults come from
`tunemesh_common.training.loss_specs`, which the scheduler validates requests against.
(Tinker's `stable_reinforce` is not: it reads sampling-time information its sampler
records server-side and does not publish.)

With lp the learner's target logprobs, q the sampler's (`logprobs`), A the advantages,
w the optional per-token `weights` (default 1) and ratio = exp(lp - q), every loss is a
sum over tokens:

    cross_entropy        -sum(w * lp)
    importance_sampling  -sum(w * ratio * A)
    ppo                  -sum(w * min(ratio * A, clamp(ratio, lo, hi) * A))
    cispo                -sum(w * detach(clamp(ratio, lo, hi)) * lp * A)
    dro                  -sum(w * (lp * A - beta / 2 * (lp - q)^2))
    gspo                 -sum(w * min(s_t * A, clamp(s_t, lo, hi) * A))

gspo (GSPO-token) replaces ppo's token ratio by the datum's sequence ratio
s = exp(mean(lp - q) over the tokens `sequence_ratio_mask` marks): each token's
s_t = detach(s) * exp(lp - detach(lp)) has s's value and the gradient of its own lp.
With no marked token s is undefined (NaN), so the item fails NON_FINITE_LOSS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch

from tunemesh_common.training.loss_specs import SPECS, LossSpec


@dataclasses.dataclass
class DatumLoss:
    """One datum's scalar loss and its outputs (e.g. `logprobs`, same shape as targets)."""

    loss: torch.Tensor
    outputs: dict[str, torch.Tensor]


LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, float | str]], DatumLoss]


def target_logprobs(logits_btv: torch.Tensor, targets_btk: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[target] for every row, position and target slot: (B, T, K), in
    float32 whatever the model's dtype."""
    return torch.log_softmax(logits_btv.float(), dim=-1).gather(-1, targets_btk)


@dataclasses.dataclass(frozen=True)
class LossDef:
    """A loss function and its spec (inputs, config defaults)."""

    fn: LossFn
    spec: LossSpec

    @property
    def required_inputs(self) -> tuple[str, ...]:
        return self.spec.required_inputs


def cross_entropy(
    logprobs: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float | str],
) -> DatumLoss:
    """-sum(weights * logprobs[target]); weights default to 1 and may be any real numbers."""
    weights = inputs.get("weights")
    loss = -(logprobs.sum() if weights is None else (weights * logprobs).sum())
    return DatumLoss(loss=loss, outputs={"logprobs": logprobs})


def _weighted_sum(per_token: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    weights = inputs.get("weights")
    return per_token.sum() if weights is None else (weights * per_token).sum()


def _ratio(logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.exp(logprobs - inputs["logprobs"])


def importance_sampling(logprobs, inputs, config) -> DatumLoss:
    """-sum(ratio * A): the policy gradient of samples drawn from the sampler's weights."""
    loss = -_weighted_sum(_ratio(logprobs, inputs) * inputs["advantages"], inputs)
    return DatumLoss(loss=loss, outputs={"logprobs": logprobs})


def _clipped_surrogate(
    ratio: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float | str]
) -> torch.Tensor:
    advantages = inputs["advantages"]
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    return -_weighted_sum(torch.minimum(ratio * advantages, clipped * advantages), inputs)


def ppo(logprobs, inputs, config) -> DatumLoss:
    """The clipped surrogate: the ratio's effect stops outside [lo, hi] in A's direction."""
    loss = _clipped_surrogate(_ratio(logprobs, inputs), inputs, config)
    return DatumLoss(loss=loss, outputs={"logprobs": logprobs})


def cispo(logprobs, inputs, config) -> DatumLoss:
    """A clipped, detached importance weight times the REINFORCE term lp * A."""
    weight = torch.clamp(_ratio(logprobs, inputs), config["clip_low_threshold"], config["clip_high_threshold"])
    loss = -_weighted_sum(weight.detach() * logprobs * inputs["advantages"], inputs)
    return DatumLoss(loss=loss, outputs={"logprobs": logprobs})


def dro(logprobs, inputs, config) -> DatumLoss:
    """lp * A with a quadratic penalty on moving away from the sampler's logprobs."""
    drift = logprobs - inputs["logprobs"]
    loss = -_weighted_sum(logprobs * inputs["advantages"] - 0.5 * config["beta"] * drift.square(), inputs)
    return DatumLoss(loss=loss, outputs={"logprobs": logprobs})


def gspo(logprobs, inputs, config) -> DatumLoss:
    """ppo's clipped surrogate on the sequence ratio (GSPO-token): one clip decision per
    datum, each token keeping the gradient of its own logprob."""
    marked = inputs["sequence_ratio_mask"] != 0
    log_ratio = torch.where(marked, logprobs.detach() - inputs["logprobs"], 0.0).sum() / marked.sum()
    ratio = torch.exp(log_ratio + logprobs - logprobs.detach())
    loss = _clipped_surrogate(ratio, inputs, config)
    return DatumLoss(loss=loss, outputs={"logprobs": logprobs})


_FUNCTIONS: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "gspo": gspo,
}
LOSSES: dict[str, LossDef] = {name: LossDef(fn=fn, spec=SPECS[name]) for name, fn in _FUNCTIONS.items()}
