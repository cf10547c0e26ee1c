"""Plain data the sampler's layers exchange: no grpc, no torch."""

from __future__ import annotations

import dataclasses
import enum


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a loaded base model accepts."""

    name: str
    family: str  # "dense" or "moe"
    vocab_size: int
    max_seq_len: int  # prompt + generated tokens
    max_lora_rank: int
    eos_token_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """How to sample one request (validated before it reaches an engine)."""

    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: all tokens
    stop: tuple[str, ...] = ()  # stop strings, cut from the output unless include_stop_str
    stop_token_ids: tuple[int, ...] = ()  # stop tokens, kept in the output
    seed: int | None = None
    include_stop_str: bool = False  # keep the tokens that completed a stop string


class StopReason(enum.Enum):
    LENGTH = "length"  # max_tokens reached
    STOP = "stop"  # a stop string / stop token / end of sequence


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """One prompt, `num_samples` continuations, with one adapter (None: the base model)."""

    adapter_key: str | None
    prompt_tokens: tuple[int, ...]
    num_samples: int
    spec: SamplingSpec
    tenant: str = ""  # whose rows: engines admit waiting rows across tenants in turn


@dataclasses.dataclass(frozen=True)
class SampledSequence:
    """One continuation: new tokens, their logprobs, why it ended."""

    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    stop_reason: StopReason
