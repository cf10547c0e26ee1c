"""Client sessions, each owned by one tenant."""

from __future__ import annotations

from collections.abc import Callable

from tunemesh.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from tunemesh_scheduler.core.ports import StoreWrite
from tunemesh_scheduler.core.records import SessionRecord


MAX_LABELS = 32  # labels per session
MAX_LABEL_BYTES = 256  # of a label's key, and of its value (UTF-8)


def check_labels(labels: dict[str, str]) -> None:
    """InvalidArgument(BAD_LABELS) unless `labels` is small: every session is kept in memory
    and journaled, so one tenant's labels must not grow the scheduler without bound."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgumentError("BAD_LABELS", f"{len(labels)} labels; a session takes at most {MAX_LABELS}")
    for key, value in labels.items():
        if not key or len(key.encode()) > MAX_LABEL_BYTES or len(value.encode()) > MAX_LABEL_BYTES:
            raise InvalidArgumentError(
                "BAD_LABELS", f"label {key[:32]!r}: keys must be 1 to {MAX_LABEL_BYTES} bytes, values at most that")


class SessionRegistry:
    """In-memory sessions keyed by name; another tenant's session reads as NotFoundError."""

    def __init__(self, clock: Callable[[], float], new_id: Callable[[], str],
                 note: Callable[[StoreWrite], int] = lambda write: 0) -> None:
        self._note = note  # journals every created or ended session
        self._clock = clock
        self._new_id = new_id
        self._sessions: dict[str, SessionRecord] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, tenant: str, labels: dict[str, str] | None = None) -> SessionRecord:
        """Open a new session for `tenant`; its labels must pass `check_labels`."""
        check_labels(labels or {})
        now = self._clock()
        record = SessionRecord(
            name=f"sessions/{self._new_id()}",
            tenant=tenant,
            labels=dict(labels or {}),
            create_time=now,
            last_heartbeat_time=now,
        )
        self._sessions[record.name] = record
        self._note(StoreWrite(record))
        return record

    def restore(self, record: SessionRecord) -> None:
        """Adopt a session from durable state."""
        self._sessions[record.name] = record

    def get(self, tenant: str, name: str) -> SessionRecord:
        """The tenant's session, or NotFoundError(SESSION_NOT_FOUND)."""
        record = self._sessions.get(name)
        if record is None or record.tenant != tenant:
            raise NotFoundError("SESSION_NOT_FOUND", f"session {name!r} not found")
        return record

    def get_open(self, tenant: str, name: str) -> SessionRecord:
        """Like `get`, but an ended session is FailedPreconditionError(SESSION_ENDED)."""
        record = self.get(tenant, name)
        if record.ended:
            raise FailedPreconditionError("SESSION_ENDED", f"session {name!r} has ended")
        return record

    def heartbeat(self, tenant: str, name: str) -> SessionRecord:
        """Record that the client is alive."""
        record = self.get_open(tenant, name)
        record.last_heartbeat_time = self._clock()
        return record

    def end(self, tenant: str, name: str) -> SessionRecord:
        """Mark the session ended (idempotent)."""
        record = self.get(tenant, name)
        if not record.ended:
            record.ended = True
            self._note(StoreWrite(record))
        return record

    def expire(self, older_than: float) -> list[SessionRecord]:
        """End the open sessions whose last heartbeat is before `older_than`; returns them."""
        expired = [s for s in self._sessions.values() if not s.ended and s.last_heartbeat_time < older_than]
        for record in expired:
            record.ended = True
            self._note(StoreWrite(record))
        return expired

    def ended(self) -> set[str]:
        return {name for name, s in self._sessions.items() if s.ended}

    def count_open(self) -> int:
        return sum(1 for s in self._sessions.values() if not s.ended)
