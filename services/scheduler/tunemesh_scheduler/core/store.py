"""`MemoryRunStore`: the in-memory twin of the etcd `RunStore`, for unit tests and for a
scheduler run without durable state. It keeps copies, as a store would: later changes
to the core's live records do not reach it until they are written."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tunemesh.errors import UnavailableError
from tunemesh_scheduler.core.ports import StoredState, StoreWrite
from tunemesh_scheduler.core.records import OperationRecord, OpState, RunRecord, SessionRecord
from tunemesh_scheduler.core.sampling import SamplingSessionRecord


def store_key(record: SessionRecord | RunRecord | OperationRecord) -> tuple:
    """One key per stored thing: sessions and runs by name, operations by (run, seq_id)."""
    if isinstance(record, OperationRecord):
        return ("op", record.run, record.seq_id)
    return (type(record).__name__, record.name)


def stored_copy(record):
    """What a store keeps of a record: an operation without its payload (kept apart)
    and RUNNING as QUEUED (whether it ran is the trainer's to say)."""
    copy = dataclasses.replace(record)
    if isinstance(copy, RunRecord):  # the floor, not the live counters
        copy.last_seq_id, copy.step = copy.floor
    if isinstance(copy, OperationRecord):
        copy.payload = None
        copy.snapshot_path = ""
        if copy.state is OpState.RUNNING:
            copy.state = OpState.QUEUED
    if isinstance(copy, SessionRecord):
        copy.labels = dict(copy.labels)
    return copy


class MemoryRunStore:
    """A RunStore in a dict; `down = True` makes it fail like an unreachable etcd."""

    def __init__(self) -> None:
        self.records: dict[tuple, object] = {}
        self.kept_payloads: dict[tuple[str, int], object] = {}  # (run, seq_id) -> call
        self.down = False
        self.applies = 0

    async def apply(self, writes: Sequence[StoreWrite]) -> None:
        if self.down:
            raise UnavailableError("ETCD_UNAVAILABLE", "memory store is down")
        self.applies += 1
        for write in writes:
            key = store_key(write.record)
            run = write.record.name if isinstance(write.record, RunRecord) else ""
            if write.delete:
                self.records.pop(key, None)
                if run:  # a run's operations and calls go with it
                    for other in [k for k in self.records if k[0] == "op" and k[1] == run]:
                        del self.records[other]
                    self._trim(run, float("inf"))
            else:
                self.records[key] = stored_copy(write.record)
            if write.payload is not None:
                self.kept_payloads[(write.record.run, write.record.seq_id)] = write.payload
            if write.drop_call:
                self.kept_payloads.pop((write.record.run, write.record.seq_id), None)
            if write.trim_through:
                self._trim(run, write.trim_through)

    def _trim(self, run: str, through: float) -> None:
        for kept in [k for k in self.kept_payloads if k[0] == run and k[1] <= through]:
            del self.kept_payloads[kept]

    async def payloads(self, run_name: str, after_seq_id: int) -> dict[int, object]:
        if self.down:
            raise UnavailableError("ETCD_UNAVAILABLE", "memory store is down")
        return {seq: p for (run, seq), p in self.kept_payloads.items() if run == run_name and seq > after_seq_id}

    async def load(self) -> StoredState:
        if self.down:
            raise UnavailableError("ETCD_UNAVAILABLE", "memory store is down")
        state = StoredState()
        for record in self.records.values():
            copy = stored_copy(record)
            if isinstance(copy, SessionRecord):
                state.sessions.append(copy)
            elif isinstance(copy, SamplingSessionRecord):
                state.sampling_sessions.append(copy)
            elif isinstance(copy, RunRecord):
                state.runs.append(copy)
            else:
                state.operations.append(copy)
        state.payloads = dict(self.kept_payloads)
        return state
