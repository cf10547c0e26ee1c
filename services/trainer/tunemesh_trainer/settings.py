"""Trainer settings: flags, else `TUNEMESH_TRAINER_*` environment variables, else defaults."""

from __future__ import annotations

import pathlib
from typing import Literal

from pydantic import Field

from tunemesh_common import settings
from tunemesh_common.settings import Device, HostPort, HostPortOrEmpty


class TrainerSettings(settings.ServiceSettings):
    """One base model with many LoRA adapter slots (`python -m tunemesh_trainer`)."""

    model_config = settings.settings_config("trainer")

    node_id: str = Field("trainer-0", min_length=1, description="this node's name in etcd and in placements")
    model: str = Field("tunemesh/tiny-dense", description="registry name of the base model to serve")
    listen: HostPort = Field("127.0.0.1:0", description="host:port to serve on; port 0 picks a free one")
    etcd: HostPortOrEmpty = Field("",
                      description="host:port of etcd; empty: run without registration (tests)")
    data_dir: pathlib.Path = Field(pathlib.Path("~/.cache/tunemesh"), description="model cache")
    models_file: pathlib.Path | None = Field(
        None, description='JSON list of extra local models, [{"name": ..., "path": ...[, "family": ...]}]')
    ready_file: pathlib.Path | None = Field(
        None, description='written once serving: {"address", "pid", "node_id", "metrics_url"} (for launchers)')
    metrics_listen: HostPortOrEmpty = Field("127.0.0.1:0",
                                description="host:port of /metrics (port 0 picks one); empty: no metrics endpoint")
    max_adapters: int = Field(64, ge=1, description="adapter slots on this node")
    num_threads: int = Field(0, ge=0, description="torch threads; 0: torch's default")
    max_batch_tokens: int = Field(8192, ge=1, description="padded tokens per chunk of a fused pass (bounds memory)")
    lease_ttl_s: int = Field(5, ge=1, description="etcd lease time-to-live, in seconds")
    advertise_host: str = Field("127.0.0.1", min_length=1, description="host others use to reach this node")
    checkpoint: HostPortOrEmpty = Field("",
                            description="host:port of the checkpoint service; empty: saves and loads fail")
    ranks: int = Field(1, ge=1, description="> 1: a DeepSpeed ZeRO-3 group of this many local ranks (this process is rank 0)")
    expert_parallel: int = Field(
        1, ge=1, description="> 1: groups of this many ranks split each MoE layer's experts (divides the ranks)")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="the frozen base's dtype (LoRA, gradients and AdamW stay float32)")
    device: Device = Field("cpu", description=(
        "torch device of a single-process trainer: cpu, cuda, cuda:N, or auto (cuda when available, else cpu); "
        "a rank group (--ranks, torchrun) puts each rank on its accelerator's device"))


def load(argv: list[str] | None = None) -> TrainerSettings:
    return settings.load(TrainerSettings, argv)
