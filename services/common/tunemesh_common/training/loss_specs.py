"""The loss catalogue both the scheduler (validation) and the trainer (compute) read.

A loss is a name, the per-token inputs it needs (each shaped like `target_tokens`) and
its numeric config keys with their defaults. `resolve_config` checks a request's config
against the spec and fills in the defaults; it raises INVALID_ARGUMENT with a reason.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

from tunemesh.errors import InvalidArgumentError

ConfigCheck = Callable[[Mapping[str, float]], str | None]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One loss: its inputs and config keys (key -> default)."""

    name: str
    required_inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...] = ()
    config: Mapping[str, float] = dataclasses.field(default_factory=dict)
    check: ConfigCheck | None = None  # returns why a resolved config is invalid, or None

    def resolve_config(self, config: Mapping[str, float | str]) -> dict[str, float]:
        unknown = sorted(set(config) - set(self.config))
        if unknown:
            accepted = sorted(self.config) or "none"
            raise InvalidArgumentError("UNKNOWN_LOSS_CONFIG", f"{self.name} takes no config keys {unknown} (accepted: {accepted})")
        resolved = dict(self.config)
        for key, value in config.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidArgumentError("BAD_LOSS_CONFIG", f"loss_fn_config[{key!r}] must be a number, got {value!r}")
            if not math.isfinite(value):
                raise InvalidArgumentError("NON_FINITE_INPUT", f"loss_fn_config[{key!r}] is not finite")
            resolved[key] = float(value)
        problem = self.check(resolved) if self.check else None
        if problem:
            raise InvalidArgumentError("BAD_LOSS_CONFIG", f"{self.name}: {problem}")
        return resolved


def _clip_range(config: Mapping[str, float]) -> str | None:
    low, high = config["clip_low_threshold"], config["clip_high_threshold"]
    if not 0.0 <= low <= high:
        return f"need 0 <= clip_low_threshold <= clip_high_threshold, got {low} and {high}"
    return None


def _beta(config: Mapping[str, float]) -> str | None:
    return None if config["beta"] >= 0 else f"beta must be >= 0, got {config['beta']}"


RL_INPUTS = ("target_tokens", "logprobs", "advantages")
# `weights` on an RL loss multiplies each token's term (default 1): a mask for positions
# whose sampler logprob is unknown, e.g. the prompt under dro's quadratic penalty.
# gspo's `sequence_ratio_mask` marks (non-zero) the tokens its sequence ratio averages over:
# the sampled ones, whose sampler logprobs are known.
# Not here: Tinker's `stable_reinforce`, whose objective reads information the Tinker
# sampler records server-side (`record_stability_info`) and does not publish.
SPECS: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("cross_entropy", ("target_tokens",), ("weights",)),
        LossSpec("importance_sampling", RL_INPUTS, ("weights",)),
        LossSpec("ppo", RL_INPUTS, ("weights",),
                 {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}, _clip_range),
        LossSpec("cispo", RL_INPUTS, ("weights",),
                 {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}, _clip_range),
        LossSpec("dro", RL_INPUTS, ("weights",), {"beta": 0.05}, _beta),
        LossSpec("gspo", (*RL_INPUTS, "sequence_ratio_mask"), ("weights",),
                 {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}, _clip_range),
    )
}
INTEGER_INPUTS = frozenset({"target_tokens"})


def spec_of(loss_fn: str) -> LossSpec:
    spec = SPECS.get(loss_fn)
    if spec is None:
        raise InvalidArgumentError("UNKNOWN_LOSS", f"unknown loss_fn {loss_fn!r}; supported: {sorted(SPECS)}")
    return spec
