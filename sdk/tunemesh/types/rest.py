"""What RestClient and AdminClient return, named after Tinker's types.

ExternalWeightsUrlsResponse and the audit log types exist for code that names them;
tunemesh returns neither (its RestClient and AdminClient raise NotImplementedError for
the calls that would).
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunemesh.checkpoints import Checkpoint
    from tunemesh.types.training import GetInfoResponse


@dataclasses.dataclass(frozen=True)
class Cursor:
    """Where a page lies in the whole listing."""

    offset: int
    limit: int
    total_count: int


@dataclasses.dataclass(frozen=True)
class CheckpointsListResponse:
    """Checkpoints (`tunemesh.Checkpoint`, with Tinker's field names as properties)."""

    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


@dataclasses.dataclass(frozen=True)
class TrainingRunsResponse:
    """Training runs, oldest first."""

    training_runs: list[GetInfoResponse]
    cursor: Cursor


@dataclasses.dataclass(frozen=True)
class WeightsInfoResponse:
    """What a checkpoint's weights are: base model and LoRA shape."""

    base_model: str
    is_lora: bool = True
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None


@dataclasses.dataclass(frozen=True)
class ExternalWeightsUrlsResponse:
    """Tinker's signed URLs of an external weights checkpoint (none in tunemesh)."""

    urls: dict[str, str]
    expires: datetime.datetime


@dataclasses.dataclass(frozen=True)
class AuditLogEntry:
    """One event of Tinker's organization audit log (tunemesh keeps none)."""

    timestamp: datetime.datetime
    event: str
    event_details: dict[str, Any] = dataclasses.field(default_factory=dict)
    model_id: str | None = None
    tinker_path: str | None = None
    purpose: str | None = None


@dataclasses.dataclass(frozen=True)
class AuditLogResponse:
    """Audit log entries, by time."""

    entries: list[AuditLogEntry]
