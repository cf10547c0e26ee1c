"""What the trainer's core needs from a compute engine: token ids in, numbers out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tunemesh_trainer.domain import AdamSpec, AdapterState, EngineItem, ItemOutcome, LoraSpec, ModelInfo


class TrainingEngine(Protocol):
    """A frozen base model with many LoRA adapter slots, trained in fused batches."""

    info: ModelInfo

    def create_adapter(self, adapter_id: str, spec: LoraSpec) -> int:
        """Create a fresh adapter; return its number of trainable parameters.

        Raises AlreadyExistsError for a duplicate id, InvalidArgumentError for a bad spec
        (rank outside [1, info.max_lora_rank], no target module).
        """
        ...

    def delete_adapter(self, adapter_id: str) -> None:
        """Drop an adapter's weights, optimizer state and gradients (NotFoundError if unknown)."""
        ...

    def adapter_ids(self) -> list[str]:
        """Ids of the adapters held, sorted."""
        ...

    def run_batch(self, items: Sequence[EngineItem]) -> list[ItemOutcome]:
        """Run forward / forward_backward items of many adapters as one fused batch.

        Returns one outcome per item, in order. A bad or non-finite item fails alone;
        gradients of successful forward_backward items accumulate until `optim_step`.
        """
        ...

    def optim_step(self, adapter_id: str, adam: AdamSpec) -> dict[str, float]:
        """Apply one AdamW step to one adapter with its accumulated gradients, then clear them."""
        ...

    def export_adapter(self, adapter_id: str, with_optimizer: bool) -> AdapterState:
        """A copy of the adapter's weights (and AdamW state and step count if asked)."""
        ...

    def import_adapter(self, adapter_id: str, state: AdapterState) -> int:
        """Overwrite the adapter from `state` and return its optimizer step count.

        The state's rank and alpha must equal the adapter's; its modules must be among
        the adapter's (modules it lacks get zero A and B: no update, and none learned).
        Without optimizer state the optimizer restarts at step 0. Accumulated gradients
        are cleared either way. Raises FailedPreconditionError / InvalidArgumentError and leaves
        the adapter untouched when the state does not fit.
        """
        ...

    def adapter_digest(self, adapter_id: str) -> str:
        """sha256 hex over the adapter's weights, optimizer state and accumulated gradients."""
        ...
