"""Trainer settings: flags, else `TUNEMESH_TRAINER_*` environment variables, else defaults."""

from __future__ import annotations

import dataclasses
import pathlib

from tunemesh_common import settings


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
    node_id: str = "trainer-0"
    model: str = "tunemesh/tiny-dense"  # registry name of the base model to serve
    listen: str = "127.0.0.1:0"  # host:port; port 0 picks a free one
    etcd: str = ""  # host:port of etcd; empty runs without registration (tests)
    data_dir: pathlib.Path = pathlib.Path("~/.cache/tunemesh").expanduser()  # model cache
    models_file: pathlib.Path | None = None  # JSON list of extra local models
    ready_file: pathlib.Path | None = None  # written once serving: {"address", "pid", "node_id", "metrics_url"}
    metrics_listen: str = "127.0.0.1:0"  # host:port of /metrics (port 0 picks one); empty: none
    max_adapters: int = 64  # adapter slots on this node
    num_threads: int = 0  # torch threads; 0 = torch's default
    max_batch_tokens: int = 8192  # padded tokens per chunk of a fused pass (bounds memory)
    lease_ttl_s: int = 5  # etcd lease time-to-live
    advertise_host: str = "127.0.0.1"  # host others use to reach this node
    checkpoint: str = ""  # host:port of the checkpoint service; empty: saves and loads fail
    ranks: int = 1  # > 1: a DeepSpeed ZeRO-3 group of this many local ranks (this process is rank 0)
    expert_parallel: int = 1  # > 1: groups of this many ranks split each MoE layer's experts (divides ranks)
    dtype: str = "float32"  # the frozen base's dtype: float32 or bfloat16 (LoRA, grads and AdamW stay float32)


def load(argv: list[str] | None = None) -> TrainerSettings:
    return settings.load(TrainerSettings, "TUNEMESH_TRAINER_", argv)
