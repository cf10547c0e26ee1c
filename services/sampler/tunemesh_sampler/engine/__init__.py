"""Sampling engines behind the `SamplingEngine` protocol; heavy imports happen in the factories."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunemesh_sampler.engine.protocol import SamplingEngine

if TYPE_CHECKING:
    import pathlib

__all__ = ["SamplingEngine", "build_torch_engine"]


def build_torch_engine(
    model_dir: pathlib.Path,
    name: str,
    family: str,
    max_lora_rank: int,
    max_seq_len: int,
    num_threads: int | None = None,
    device: str = "cpu",
    max_batch_rows: int = 64,
) -> SamplingEngine:
    """Load a base model from a local HF directory into a batched multi-LoRA torch engine;
    the directory's tokenizer, if any, serves stop strings."""
    from tunemesh_sampler.engine.torch_engine import TorchSamplingEngine, load_detokenizer

    return TorchSamplingEngine(
        model_dir,
        name=name,
        family=family,
        max_lora_rank=max_lora_rank,
        max_seq_len=max_seq_len,
        num_threads=num_threads,
        device=device,
        max_batch_rows=max_batch_rows,
        detokenize=load_detokenizer(model_dir),
    )
