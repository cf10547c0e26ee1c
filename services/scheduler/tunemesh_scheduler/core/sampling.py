"""Sampling sessions: what a session samples from (base model or one immutable
checkpoint) is fixed at creation; which sampler serves it may change if that node goes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tunemesh_common.errors import NotFound
from tunemesh_scheduler.core.ports import StoreWrite


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
        """The tenant's sampling session, or NotFound."""
        record = self._sessions.get(name)
        if record is None or record.tenant != tenant:
            raise NotFound("SAMPLING_SESSION_NOT_FOUND", f"sampling session {name!r} not found")
        return record
