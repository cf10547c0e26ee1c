"""What a SamplingClient takes and returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

StopReason = Literal["length", "stop"]
"""Why a sequence ended: its token budget ran out, or it met a stop string or token."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. `max_tokens` None: up to the model's context limit. `stop` takes
    strings (cut from the text unless `include_stop_str`) or token ids (kept);
    temperature 0 is greedy; top_k 0 or -1 and top_p 1 disable those filters."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: str | Sequence[str] | Sequence[int] | None = None
    seed: int | None = None
    include_stop_str: bool = False


@dataclasses.dataclass(frozen=True)
class SampledSequence:
    """One continuation: its new tokens, their logprobs, why it ended and its id
    (distinct for every sequence the service returns)."""

    tokens: list[int]
    logprobs: list[float]
    stop_reason: StopReason
    sequence_id: str = ""


@dataclasses.dataclass(frozen=True)
class SampleResponse:
    """Result of SamplingClient.sample; `prompt_logprobs` (first None) when asked for."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
