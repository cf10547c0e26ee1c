"""Sampling sessions: what a session samples from (base model or one immutable
checkpoint) is fixed at creation; which sampler serves it may change if that node goes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

from tunemesh_common.checkpoints.paths import adapter_key
from tunemesh.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from tunemesh_scheduler.core.ports import StoreWrite


class CheckpointLookup(Protocol):
    """The tenant's checkpoints (the checkpoint service, through the scheduler)."""

    async def get(self, tenant: str, path: str):
        """The checkpoint at `path` (with `.path` and `.base_model`); NotFoundError for
        another tenant's path."""
        ...


class SamplerRoutes(Protocol):
    """Which samplers serve which base model."""

    def model(self, base_model: str) -> object:
        """NotFoundError(UNKNOWN_MODEL) when no sampler serves it."""
        ...

    def route(self, base_model: str, adapter_key: str = "") -> str:
        """The sampler node for a new sampling session."""
        ...


async def sampling_source(tenant: str, base_model: str, model_path: str,
                          checkpoints: CheckpointLookup) -> tuple[str, str, str]:
    """(base model, checkpoint path, adapter key) a new sampling session samples from:
    a base model, or one of the tenant's checkpoints (then its base model; a `base_model`
    given as well must be that one)."""
    if not model_path:
        if not base_model:
            raise InvalidArgumentError("MISSING_MODEL", "give base_model or model_path")
        return base_model, "", ""
    checkpoint = await checkpoints.get(tenant, model_path)
    if base_model and base_model != checkpoint.base_model:
        raise FailedPreconditionError("WRONG_BASE_MODEL", f"{checkpoint.path} is for {checkpoint.base_model}")
    return checkpoint.base_model, checkpoint.path, adapter_key(tenant, checkpoint.path)


@dataclasses.dataclass(slots=True)
class SamplingSessionRecord:
    """`sampling_sessions/{id}` of one tenant."""

    name: str
    tenant: str
    session: str
    base_model: str
    model_path: str  # "" for the base model
    adapter_key: str  # "" for the base model
    node_id: str
    create_time: float


class SamplingSessionRegistry:
    """In-memory sampling sessions keyed by name."""

    def __init__(self, clock: Callable[[], float], new_id: Callable[[], str],
                 note: Callable[[StoreWrite], int] = lambda write: 0) -> None:
        self._clock, self._new_id, self._note = clock, new_id, note  # `note` journals creates
        self._sessions: dict[str, SamplingSessionRecord] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, tenant: str, session: str, base_model: str, model_path: str, adapter_key: str,
               node_id: str) -> SamplingSessionRecord:
        record = SamplingSessionRecord(
            f"sampling_sessions/{self._new_id()}", tenant, session, base_model, model_path, adapter_key, node_id,
            self._clock(),
        )
        self._sessions[record.name] = record
        self._note(StoreWrite(record))
        return record

    def restore(self, record: SamplingSessionRecord) -> None:
        """Adopt a sampling session from durable state."""
        self._sessions[record.name] = record

    def get(self, tenant: str, name: str) -> SamplingSessionRecord:
        """The tenant's sampling session, or NotFoundError."""
        record = self._sessions.get(name)
        if record is None or record.tenant != tenant:
            raise NotFoundError("SAMPLING_SESSION_NOT_FOUND", f"sampling session {name!r} not found")
        return record
