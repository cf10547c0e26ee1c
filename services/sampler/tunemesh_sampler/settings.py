"""Sampler settings: flags, else `TUNEMESH_SAMPLER_*` environment variables, else defaults."""

from __future__ import annotations

import dataclasses
import pathlib

from tunemesh_common import settings


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    node_id: str = "sampler-0"
    model: str = "tunemesh/tiny-dense"  # registry name of the base model to serve
    engine: str = "auto"  # "vllm", "torch", or "auto" (vLLM when installed and it can serve the model)
    listen: str = "127.0.0.1:0"  # host:port; port 0 picks a free one
    etcd: str = ""  # host:port of etcd; empty runs without registration (tests)
    checkpoint: str = ""  # host:port of the checkpoint service
    data_dir: pathlib.Path = pathlib.Path("~/.cache/tunemesh").expanduser()  # model cache
    models_file: pathlib.Path | None = None  # JSON list of extra local models
    cache_dir: pathlib.Path = pathlib.Path("~/.cache/tunemesh/sampler-adapters").expanduser()  # fetched adapters
    ready_file: pathlib.Path | None = None  # written once serving: {"address", "pid", "node_id", "metrics_url"}
    metrics_listen: str = "127.0.0.1:0"  # host:port of /metrics (port 0 picks one); empty: none
    max_adapters: int = 8  # adapters resident at once; more are evicted (LRU) and reloaded
    max_lora_rank: int = 0  # 0: the model's registry default
    num_threads: int = 0  # torch threads; 0 = torch's default
    lease_ttl_s: int = 5  # etcd lease time-to-live
    advertise_host: str = "127.0.0.1"  # host others use to reach this node


def load(argv: list[str] | None = None) -> SamplerSettings:
    return settings.load(SamplerSettings, "TUNEMESH_SAMPLER_", argv)
