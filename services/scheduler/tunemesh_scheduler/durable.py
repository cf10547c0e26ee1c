"""`EtcdRunStore`: the scheduler's durable control state in etcd (a core `RunStore`).

Layout (values are `tunemesh.internal.v1.scheduler_state` messages):

    /tunemesh/sessions/{session_id}          StoredSession
    /tunemesh/sampling_sessions/{id}         StoredSamplingSession
    /tunemesh/runs/{run_id}                  StoredRun: owner, LoRA, node, epoch, latest
                                             snapshot, and the floor (last_seq_id, step)
                                             below which its operation log was compacted
    /tunemesh/oplog/{run_id}/{seq_id:020d}   StoredOperation: one per operation of the run,
                                             its result once it succeeded
    /tunemesh/calls/{run_id}/{seq_id:020d}   StoredPayload: the operation's call, written
                                             once at submit, deleted once a snapshot after
                                             it is written; a call over INLINE_PAYLOAD_BYTES
                                             only names its copy in the checkpoint
                                             service's call store (StoredCallRef)

A batch of changes is written in order, in as few transactions as etcd's limits allow
(128 operations and 1.5 MiB per request; overlapping operations never share one); a
later change of one key in the same batch replaces an earlier one. A result too large
to keep (over INLINE_RESULT_BYTES) is not stored: after a restart its operation answers
DATA_LOSS RESULT_NOT_KEPT.

A call over INLINE_PAYLOAD_BYTES goes to the call store (`CallStore`) before any etcd
write of its batch, so etcd never names a call that is not there; without a call store it
is not kept (a move of its run fails with CALL_NOT_KEPT). Calls a trim or a run deletion
drops from etcd are then deleted from the call store too, best effort: a leftover there
is never read (etcd no longer names it) and a later put of its key replaces it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Protocol

from tunemesh_internal.v1 import scheduler_state_pb2 as pb
from tunemesh_common.membership import registry
from tunemesh.errors import FailedPreconditionError, NotFoundError, TunemeshError, UnavailableError
from tunemesh_scheduler.core.ports import StoredState, StoreWrite
from tunemesh_scheduler.core.records import OperationRecord, RunRecord, SessionRecord
from tunemesh_scheduler.core.sampling import SamplingSessionRecord
from tunemesh_scheduler.durable_codec import (
    encode, operation_record, payload_of, run_record, sampling_session_record, session_record, stored_payload,
)

log = logging.getLogger(__name__)

INLINE_PAYLOAD_BYTES = 512 * 1024  # larger calls go to the call store (or, without one, are not kept)
TXN_BYTES = 1024 * 1024
TXN_OPS = 100  # etcd allows 128 operations per transaction


def _prefix(kind: str) -> bytes:
    return f"{registry.ROOT}/{kind}/".encode()


def key_of(record) -> bytes:
    if isinstance(record, SamplingSessionRecord):
        return _prefix("sampling_sessions") + record.name.removeprefix("sampling_sessions/").encode()
    if isinstance(record, SessionRecord):
        return _prefix("sessions") + record.name.removeprefix("sessions/").encode()
    if isinstance(record, RunRecord):
        return registry.run_key(record.name.removeprefix("runs/"))
    return oplog_prefix(record.run) + _seq(record.seq_id)


def oplog_prefix(run_name: str) -> bytes:
    return _prefix("oplog") + run_name.removeprefix("runs/").encode() + b"/"


def calls_prefix(run_name: str) -> bytes:
    return _prefix("calls") + run_name.removeprefix("runs/").encode() + b"/"


def _seq(seq_id: int) -> bytes:
    return f"{seq_id:020d}".encode()


def _after_prefix(prefix: bytes) -> bytes:
    """The end of the key range of `prefix` (which ends in '/')."""
    return prefix[:-1] + b"0"


class CallStore(Protocol):
    """Where calls too large for etcd are kept, by (run name, seq_id): the checkpoint
    service (`tunemesh_common.checkpoints.client.CallStoreClient`). Raises typed errors."""

    async def put(self, run: str, seq_id: int, data: bytes) -> None:
        """Keep `data`, replacing what was kept under the key."""
        ...

    async def get(self, run: str, seq_id: int) -> bytes:
        """What was kept; NotFoundError when nothing is."""
        ...

    async def delete(self, run: str, through_seq_id: int | None = None) -> int:
        """Drop the run's calls up to `through_seq_id` (None: all)."""
        ...


class EtcdRunStore:
    """RunStore on etcd (one aetcd client of the scheduler's event loop); calls over
    INLINE_PAYLOAD_BYTES in `calls` (None: not kept)."""

    def __init__(self, client, calls: CallStore | None = None) -> None:
        self._client = client
        self._txn = client.transactions
        self._fence: list = []  # compares every write makes (the writer still leads)
        self._calls = calls
        self._runs_with_stored_calls: set[str] = set()  # runs whose trims and deletion reach `calls`

    def fence(self, leader_key: bytes, token: int) -> None:
        """Write only while `leader_key` is the one this replica created (revision
        `token`): a deposed leader's late writes are refused, never applied."""
        self._fence = [self._txn.create(leader_key) == token]

    async def apply(self, writes: Sequence[StoreWrite]) -> None:
        """Write `writes` in order: a record changed twice is put once, at its last
        change; a range delete goes in a transaction of its own (etcd refuses a
        transaction whose operations overlap). Large calls reach the call store first
        (UnavailableError, and nothing written, if it fails); the calls dropped from etcd
        leave it last."""
        last = {key_of(w.record): i for i, w in enumerate(writes)}
        calls = await self._keep_calls(writes)
        group, keys, size = [], set(), 0
        for index, write in enumerate(writes):
            key = key_of(write.record)
            for op, ranged in _call_ops(self._txn, write, calls.get(index)) + (
                _record_ops(self._txn, key, write) if last[key] == index else []
            ) + _trim_ops(self._txn, write):
                weight = len(op.key) + len(getattr(op, "value", b"") or b"")
                if group and (ranged or op.key in keys or len(group) >= TXN_OPS or size + weight > TXN_BYTES):
                    await self._commit(group)
                    group, keys, size = [], set(), 0
                group.append(op)
                keys.add(op.key)
                size += weight
                if ranged:
                    await self._commit(group)
                    group, keys, size = [], set(), 0
        if group:
            await self._commit(group)
        await self._drop_stored_calls(_dropped_calls(writes, last))

    async def _keep_calls(self, writes: Sequence[StoreWrite]) -> dict[int, bytes]:
        """The etcd value of each new call of `writes` (by index) that is kept: the call
        itself, or a StoredCallRef to its copy put in the call store here."""
        values = {}
        for index, write in enumerate(writes):
            if write.payload is None:
                continue
            op = write.record
            stored = stored_payload(write.payload)
            if stored.ByteSize() <= INLINE_PAYLOAD_BYTES:
                values[index] = stored.SerializeToString()
            elif self._calls is None:
                log.info("call %s of %s is too large to keep (%d bytes)", op.seq_id, op.run, stored.ByteSize(),
                         extra={"run": op.run})
            else:  # deterministic: a deposed leader's late put of the same call writes the same bytes
                values[index] = await self._put_call(op, stored.SerializeToString(deterministic=True))
        return values

    async def _put_call(self, op: OperationRecord, data: bytes) -> bytes:
        try:
            await self._calls.put(op.run, op.seq_id, data)
        except TunemeshError as exc:
            raise UnavailableError("CALL_STORE_UNAVAILABLE", f"keeping call {op.seq_id} of {op.run}: {exc}") from None
        self._runs_with_stored_calls.add(op.run)
        ref = pb.StoredCallRef(size_bytes=len(data), sha256=hashlib.sha256(data).digest())
        return pb.StoredPayload(kind=op.kind.value, call_store=ref).SerializeToString()

    async def _drop_stored_calls(self, dropped: list[tuple[str, int | None]]) -> None:
        """Delete from the call store what etcd no longer names; a failure is logged only."""
        for run, through in dropped:
            if run not in self._runs_with_stored_calls:
                continue
            try:
                await self._calls.delete(run, through)
            except TunemeshError as exc:
                log.warning("could not delete calls of %s through %s from the call store (left there): %s",
                            run, "the last" if through is None else through, exc, extra={"run": run})
                continue
            if through is None:
                self._runs_with_stored_calls.discard(run)

    async def _commit(self, ops: list) -> None:
        try:
            succeeded, _ = await self._client.transaction(compare=self._fence, success=ops, failure=[])
        except registry.ETCD_ERRORS as exc:
            raise UnavailableError("ETCD_UNAVAILABLE", f"etcd: {exc!r}") from None
        if not succeeded:
            raise FailedPreconditionError("NOT_LEADER", "this scheduler no longer leads: its write was refused")

    async def load(self) -> StoredState:
        state = StoredState()
        try:
            sessions = await self._client.get_prefix(_prefix("sessions"))
            samplings = await self._client.get_prefix(_prefix("sampling_sessions"))
            runs = await self._client.get_prefix(f"{registry.ROOT}/runs/".encode())
            ops = await self._client.get_prefix(_prefix("oplog"))
        except registry.ETCD_ERRORS as exc:
            raise UnavailableError("ETCD_UNAVAILABLE", f"etcd: {exc!r}") from None
        state.sessions = [session_record(pb.StoredSession.FromString(kv.value)) for kv in sessions]
        state.sampling_sessions = [sampling_session_record(pb.StoredSamplingSession.FromString(kv.value))
                                   for kv in samplings]
        state.runs = [run_record(pb.StoredRun.FromString(kv.value)) for kv in runs]
        state.operations = [operation_record(pb.StoredOperation.FromString(kv.value)) for kv in ops]
        try:
            calls = await self._client.get_prefix(_prefix("calls"))
        except registry.ETCD_ERRORS as exc:
            raise UnavailableError("ETCD_UNAVAILABLE", f"etcd: {exc!r}") from None
        calls_root = len(_prefix("calls"))
        queued = {(op.run, op.seq_id) for op in state.operations if not op.done}
        for kv in calls:
            run_id, _, seq = kv.key[calls_root:].decode().partition("/")
            key, stored = (f"runs/{run_id}", int(seq)), pb.StoredPayload.FromString(kv.value)
            if stored.HasField("call_store"):
                self._runs_with_stored_calls.add(key[0])
                if key not in queued:
                    continue  # only a replay needs it: payloads() fetches it then
            if (call := await self._resolved(*key, stored)) is not None:
                state.payloads[key] = call
        return state

    async def payloads(self, run_name: str, after_seq_id: int) -> dict[int, object]:
        prefix = calls_prefix(run_name)
        try:
            calls = await self._client.get_range(prefix + _seq(after_seq_id + 1), _after_prefix(prefix))
        except registry.ETCD_ERRORS as exc:
            raise UnavailableError("ETCD_UNAVAILABLE", f"etcd: {exc!r}") from None
        found = {}
        for kv in calls:
            seq_id = int(kv.key[len(prefix):])
            found[seq_id] = await self._resolved(run_name, seq_id, pb.StoredPayload.FromString(kv.value))
        return {seq_id: call for seq_id, call in found.items() if call is not None}

    async def _resolved(self, run: str, seq_id: int, stored: pb.StoredPayload):
        """The call of a kept StoredPayload, fetched from the call store when etcd only names
        it there: None (logged) when it is gone from there or damaged, UnavailableError when the
        call store cannot be reached."""
        if not stored.HasField("call_store"):
            return payload_of(stored)
        ref = stored.call_store
        if self._calls is None:
            log.error("call %d of %s is in the call store, but this scheduler has none", seq_id, run,
                      extra={"run": run})
            return None
        try:
            data = await self._calls.get(run, seq_id)
        except NotFoundError:
            log.error("call %d of %s is missing from the call store", seq_id, run, extra={"run": run})
            return None
        except TunemeshError as exc:
            raise UnavailableError("CALL_STORE_UNAVAILABLE", f"reading call {seq_id} of {run}: {exc}") from None
        if len(data) != ref.size_bytes or hashlib.sha256(data).digest() != ref.sha256:
            log.error("call %d of %s in the call store does not match its sha256", seq_id, run, extra={"run": run})
            return None
        return payload_of(pb.StoredPayload.FromString(data))


def _record_ops(txn, key: bytes, write: StoreWrite) -> list[tuple[object, bool]]:
    """(etcd operation, is a range delete) of a record's put or delete."""
    if not write.delete:
        return [(txn.put(key, encode(write.record)), False)]
    ops = [(txn.delete(key), False)]
    if isinstance(write.record, RunRecord):  # its operation log and calls go with it
        for prefix in (oplog_prefix(write.record.name), calls_prefix(write.record.name)):
            ops.append((txn.delete(prefix, _after_prefix(prefix)), True))
    return ops


def _call_ops(txn, write: StoreWrite, value: bytes | None) -> list[tuple[object, bool]]:
    """A new operation's call to keep (before its record), when it is kept."""
    if value is None:
        return []
    return [(txn.put(calls_prefix(write.record.run) + _seq(write.record.seq_id), value), False)]


def _trim_ops(txn, write: StoreWrite) -> list[tuple[object, bool]]:
    """A finished operation's call no replay needs, or a run's calls a snapshot covers,
    to drop (after the record)."""
    if write.drop_call:
        return [(txn.delete(calls_prefix(write.record.run) + _seq(write.record.seq_id)), False)]
    if not write.trim_through:
        return []
    prefix = calls_prefix(write.record.name)
    return [(txn.delete(prefix, prefix + _seq(write.trim_through + 1)), True)]


def _dropped_calls(writes: Sequence[StoreWrite], last: dict[bytes, int]) -> list[tuple[str, int | None]]:
    """(run, through seq_id; None: all) of the calls `writes` drop from etcd, as apply
    writes them (a run's deletion only when it is the run's last change). Deleting them
    after the whole batch is safe: a call is kept once, at submit, before any trim that
    covers it."""
    dropped = []
    for index, write in enumerate(writes):
        if write.trim_through:
            dropped.append((write.record.name, write.trim_through))
        if write.delete and isinstance(write.record, RunRecord) and last[key_of(write.record)] == index:
            dropped.append((write.record.name, None))
    return dropped
