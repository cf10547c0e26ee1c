"""Scheduler core: sessions, runs, operations, per-run ordering and fused batching.

Pure asyncio on plain dataclasses; imports neither grpc nor torch. The server layer
decodes protos, calls `SchedulerCore`, and implements the ports in `ports.py`.
"""

from tunemesh_scheduler.core.ports import (
    BatchItem, ItemOutcome, LoadRequest, LoadResult, PlacementPort, SaveRequest, TrainerPort,
)
from tunemesh_scheduler.core.records import (
    OperationError,
    OperationRecord,
    OpKind,
    OpState,
    RunRecord,
    SessionRecord,
)
from tunemesh_scheduler.core.scheduler import SchedulerConfig, SchedulerCore

__all__ = [
    "BatchItem",
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
    "TrainerPort",
]
