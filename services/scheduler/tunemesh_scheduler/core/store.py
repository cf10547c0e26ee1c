"""`MemoryRunStore`: the in-memory twin of the etcd `RunStore`, for unit tests and for a
scheduler run without durable state. It keeps copies, as a store would: later changes
to the core's live records do not reach it until they are written."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tunemesh_common.errors import Unavailable
from tunemesh_scheduler.core.ports import StoredState, StoreWrite
from tunemesh_scheduler.core.records import OperationRecord, RunRecord, SessionRecord


def store_key(record: SessionRecord | RunRecord | OperationRecord) -> tuple:
    """One key per stored thing: sessions and runs by name, operations by (run, seq_id)."""
    if isinstance(record, OperationRecord):
        return ("op", record.run, record.seq_id)
    return (type(record).__name__, record.name)


def stored_copy(record):
    """What a store keeps of a record: an operation's payload only while it is
    unfinished, its result only once it succeeded."""
    copy = dataclasses.replace(record)
    if isinstance(copy, OperationRecord) and copy.done:
        copy.payload = None
    if isinstance(copy, SessionRecord):
        copy.labels = dict(copy.labels)
    return copy


class MemoryRunStore:
    """A RunStore in a dict; `down = True` makes it fail like an unreachable etcd."""

    def __init__(self) -> None:
        self.records: dict[tuple, object] = {}
        self.down = False
        self.applies = 0

    async def apply(self, writes: Sequence[StoreWrite]) -> None:
        if self.down:
            raise Unavailable("ETCD_UNAVAILABLE", "memory store is down")
        self.applies += 1
        for write in writes:
            key = store_key(write.record)
            if write.delete:
                self.records.pop(key, None)
                if isinstance(write.record, RunRecord):  # a run's operations go with it
                    for other in [k for k in self.records if k[0] == "op" and k[1] == write.record.name]:
                        del self.records[other]
            else:
                self.records[key] = stored_copy(write.record)

    async def load(self) -> StoredState:
        if self.down:
            raise Unavailable("ETCD_UNAVAILABLE", "memory store is down")
        state = StoredState()
        for record in self.records.values():
            copy = stored_copy(record)
            if isinstance(copy, SessionRecord):
                state.sessions.append(copy)
            elif isinstance(copy, RunRecord):
                state.runs.append(copy)
            else:
                state.operations.append(copy)
        return state
