"""The trainer's compute engine, behind the `TrainingEngine` protocol.

Nothing here imports torch at import time: `build_torch_engine` imports it lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunemesh_trainer.engine.protocol import TrainingEngine

if TYPE_CHECKING:
    import pathlib

__all__ = ["TrainingEngine", "build_torch_engine"]


def build_torch_engine(
    model_dir: pathlib.Path,
    name: str,
    family: str,
    max_lora_rank: int,
    max_seq_len: int,
    num_threads: int | None = None,
    device: str = "cpu",
    max_batch_tokens: int = 8192,
    dtype: str = "float32",
    batch_invariant: bool = True,
) -> TrainingEngine:
    """Load a base model from a local HF directory into a fused multi-LoRA torch engine on
    `device` ("auto": cuda when available, else cpu), the frozen base in `dtype` (float32
    or bfloat16); `batch_invariant`: see TorchTrainingEngine."""
    from tunemesh_trainer.engine.torch_engine import TorchTrainingEngine

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"

    return TorchTrainingEngine(
        model_dir,
        name=name,
        family=family,
        max_lora_rank=max_lora_rank,
        max_seq_len=max_seq_len,
        num_threads=num_threads,
        device=device,
        max_batch_tokens=max_batch_tokens,
        dtype=dtype,
        batch_invariant=batch_invariant,
    )
