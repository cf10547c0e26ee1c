"""What the service serves: GetServerCapabilitiesResponse."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SupportedModel:
    """A base model the service can train on."""

    model_name: str
    family: str = ""
    vocab_size: int = 0
    max_seq_len: int = 0
    max_lora_rank: int = 0


@dataclasses.dataclass(frozen=True)
class GetServerCapabilitiesResponse:
    """Models served now and the per-request limits."""

    supported_models: list[SupportedModel]
    max_datums: int = 0
    max_tokens: int = 0
