"""Trainer settings: flags, else `TUNEMESH_TRAINER_*` environment variables, else defaults."""

from __future__ import annotations

import pathlib
from typing import Literal

from pydantic import Field

from tunemesh_common.service import settings
from tunemesh_common.service.settings import Device, HostPortOrEmpty


class TrainerSettings(settings.NodeSettings):
    """One base model with many LoRA adapter slots (`python -m tunemesh_trainer`)."""

    model_config = settings.settings_config("trainer")

    node_id: str = Field("trainer-0", min_length=1, description="this node's name in etcd and in placements")
    max_adapters: int = Field(64, ge=1, description="adapter slots on this node")
    max_batch_tokens: int = Field(8192, ge=1, description="padded tokens per chunk of a fused pass (bounds memory)")
    checkpoint: HostPortOrEmpty = Field("",
                            description="host:port of the checkpoint service; empty: saves and loads fail")
    checkpoint_handoff_dir: pathlib.Path | None = Field(
        None, description="the checkpoint service's handoff directory, when it runs on this host: checkpoints and "
                          "snapshots are written there and taken by rename instead of streamed; unset: streamed")
    ranks: int = Field(1, ge=1, description="> 1: a DeepSpeed ZeRO-3 group of this many local ranks (this process is rank 0)")
    expert_parallel: int = Field(
        1, ge=1, description="> 1: groups of this many ranks split each MoE layer's experts (divides the ranks)")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description=(
            "the frozen base's dtype (LoRA, gradients and AdamW stay float32); float32 on every device unless "
            "asked, so the trainer's logprobs stay the reference"))
    batch_invariant: bool = Field(True, description=(
        "a row's logprobs never depend on what shares its batch, and equal the torch sampler's bit for bit "
        "when it runs in the same mode (docs/numerics.md); false: torch's fastest kernels"))
    device: Device = Field("auto", description=(
        "torch device of a single-process trainer: cpu, cuda, cuda:N, or auto (cuda when available, else cpu); "
        "a rank group (--ranks, torchrun) puts each rank on its accelerator's device"))


def load(argv: list[str] | None = None) -> TrainerSettings:
    return settings.load(TrainerSettings, argv)
