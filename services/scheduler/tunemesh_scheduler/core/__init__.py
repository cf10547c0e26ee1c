"""Scheduler core: sessions, runs, operations, per-run ordering and fused batching.

Pure asyncio on plain dataclasses; imports neither grpc nor torch. The server layer
decodes protos, calls `SchedulerCore`, and implements the ports in `ports.py`.
"""

from tunemesh_scheduler.core.ports import BatchItem, ItemOutcome, LoadResult, PlacementPort, TrainerPort
from tunemesh_scheduler.core.records import (
    OperationError,
    OperationRecord,
    OpKind,
    OpState,
    RunRecord,
    SessionRecord,
)
from tunemesh_scheduler.core.scheduler import SchedulerConfig, SchedulerCore
from tunemesh_scheduler.core.work import DataWork, LoadRequest, SaveRequest, StepWork, Work, kind_of

__all__ = [
    "BatchItem",
    "DataWork",
    "ItemOutcome",
    "LoadRequest",
    "LoadResult",
    "OpKind",
    "OpState",
    "OperationError",
    "OperationRecord",
    "PlacementPort",
    "RunRecord",
    "SaveRequest",
    "SchedulerConfig",
    "SchedulerCore",
    "SessionRecord",
    "StepWork",
    "TrainerPort",
    "Work",
    "kind_of",
]
