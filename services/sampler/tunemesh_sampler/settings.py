"""Sampler settings: flags, else `TUNEMESH_SAMPLER_*` environment variables, else defaults."""

from __future__ import annotations

import pathlib
from typing import Literal

from pydantic import ByteSize, Field

from tunemesh_common import settings
from tunemesh_common.settings import Device, HostPort, HostPortOrEmpty


class SamplerSettings(settings.ServiceSettings):
    """Generation from a base model with many LoRA adapters (`python -m tunemesh_sampler`)."""

    model_config = settings.settings_config("sampler")

    node_id: str = Field("sampler-0", min_length=1, description="this node's name in etcd")
    model: str = Field("tunemesh/tiny-dense", description="registry name of the base model to serve")
    engine: Literal["auto", "vllm", "torch"] = Field(
        "auto", description="generation engine; auto: vLLM on a CUDA host where it can serve the model, else torch")
    listen: HostPort = Field("127.0.0.1:0", description="host:port to serve on; port 0 picks a free one")
    etcd: HostPortOrEmpty = Field("",
                      description="host:port of etcd; empty: run without registration (tests)")
    checkpoint: HostPortOrEmpty = Field("", description="host:port of the checkpoint service")
    data_dir: pathlib.Path = Field(pathlib.Path("~/.cache/tunemesh"), description="model cache")
    models_file: pathlib.Path | None = Field(
        None, description='JSON list of extra local models, [{"name": ..., "path": ...[, "family": ...]}]')
    cache_dir: pathlib.Path = Field(pathlib.Path("~/.cache/tunemesh/sampler-adapters"),
                                    description="where fetched adapters are kept (a folder per node)")
    ready_file: pathlib.Path | None = Field(
        None, description='written once serving: {"address", "pid", "node_id", "metrics_url"} (for launchers)')
    metrics_listen: HostPortOrEmpty = Field("127.0.0.1:0",
                                description="host:port of /metrics (port 0 picks one); empty: no metrics endpoint")
    max_adapters: int = Field(8, ge=1, description="adapters resident at once; more are evicted (LRU) and reloaded")
    max_lora_rank: int = Field(0, ge=0, description="largest LoRA rank served; 0: the model's registry default")
    num_threads: int = Field(0, ge=0, description="torch threads; 0: torch's default")
    lease_ttl_s: int = Field(5, ge=1, description="etcd lease time-to-live, in seconds")
    advertise_host: str = Field("127.0.0.1", min_length=1, description="host others use to reach this node")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="the base model's dtype (float32 matches the trainer's logprobs)")
    device: Device = Field("cpu", description=(
        "torch engine's device: cpu, cuda, cuda:N, or auto (cuda when available, else cpu); "
        "vLLM runs on its own platform"))
    kv_cache_bytes: ByteSize = Field(ByteSize(1 << 30), gt=0, description=(
        "vLLM engine's KV cache, in bytes or with a unit (512MiB, 2GiB); the torch engine sizes its cache per batch"))


def load(argv: list[str] | None = None) -> SamplerSettings:
    return settings.load(SamplerSettings, argv)
