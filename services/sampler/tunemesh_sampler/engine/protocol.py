"""What the sampler's core needs from a generation engine: token ids in, tokens out."""

from __future__ import annotations

import pathlib
from typing import Protocol

from tunemesh_sampler.domain import GenerateRequest, ModelInfo, SampledSequence


class SamplingEngine(Protocol):
    """A base model generating for many requests at once, each with its own LoRA adapter.

    Adapters are named by an opaque `adapter_key` that identifies immutable weights: the
    core never loads two different weights under one key. Requests with
    `adapter_key=None` use the base model alone, also when batched with adapter rows.
    """

    info: ModelInfo

    def load_adapter(self, adapter_key: str, directory: pathlib.Path) -> None:
        """Make a PEFT adapter directory usable under `adapter_key` (blocking; may be slow).

        Raises InvalidArgumentError when the adapter does not fit the model (rank above
        `info.max_lora_rank`, unknown target modules, shapes)."""
        ...

    def unload_adapter(self, adapter_key: str) -> None:
        """Free an adapter; the core calls this only when no request uses it."""
        ...

    async def generate(self, request: GenerateRequest) -> list[SampledSequence]:
        """`request.num_samples` continuations. Concurrent calls are batched together.
        Same seed, prompt, spec and adapter give the same sequences."""
        ...

    async def prompt_logprobs(self, adapter_key: str | None, tokens: tuple[int, ...]) -> list[float]:
        """logprob of tokens[i] given tokens[:i], for i = 1 .. len(tokens) - 1."""
        ...

    def failure(self) -> str | None:
        """Why the engine can serve nothing more (e.g. its engine-core process died), or
        None while it can. The sampler exits on a failure, to be restarted."""
        ...

    def close(self) -> None:
        """Release the engine's threads and memory."""
        ...
