"""Idempotency of submissions: is a call new, a retry of one already held, or a
conflict? Pure functions over the operation records (no I/O, no clock)."""

from __future__ import annotations

from tunemesh.errors import AlreadyExistsError, FailedPreconditionError, InvalidArgumentError
from tunemesh_scheduler.core.records import OperationRecord, OpKind
from tunemesh_scheduler.core.sequencing import RunLane


def check_call(seq_id: int, kind: OpKind | str, num_tokens: int) -> OpKind:
    """The call's kind, or InvalidArgumentError for a bad seq_id, token count or kind."""
    if seq_id < 1:
        raise InvalidArgumentError("INVALID_SEQ_ID", f"seq_id must be >= 1, got {seq_id}")
    if num_tokens < 0:
        raise InvalidArgumentError("INVALID_NUM_TOKENS", "num_tokens must be >= 0")
    try:
        return OpKind(kind)
    except ValueError:
        raise InvalidArgumentError("UNSUPPORTED_KIND", f"unsupported operation kind {kind!r}") from None


def find_duplicate(
    by_request: OperationRecord | None,
    lane: RunLane,
    seq_id: int,
    request_id: str,
    kind: OpKind,
    digest: bytes | str,
) -> OperationRecord | None:
    """An earlier identical submission, or None for a new one.

    Raises AlreadyExistsError(REQUEST_ID_REUSED) when the tenant's request id names a
    different call, AlreadyExistsError(SEQ_ID_REUSED) when the run's seq_id holds a
    different call, and FailedPreconditionError(SEQ_ID_PASSED) for a seq_id at or below
    the run's `last_seq_id` that the core holds no record of (e.g. after restore).
    """
    call = (lane.run.name, seq_id, kind, digest)
    if by_request is not None and not _same_call(by_request, call):
        raise AlreadyExistsError(
            "REQUEST_ID_REUSED", f"request id {request_id!r} was used for another call"
        )
    by_seq = lane.find(seq_id)
    if by_seq is not None:
        if not _same_call(by_seq, call):
            raise AlreadyExistsError(
                "SEQ_ID_REUSED", f"seq_id {seq_id} of {lane.run.name} holds another call"
            )
        return by_seq
    if by_request is not None:
        return by_request
    if seq_id <= lane.run.last_seq_id:
        raise FailedPreconditionError(
            "SEQ_ID_PASSED", f"seq_id {seq_id} <= last_seq_id {lane.run.last_seq_id}"
        )
    return None


def _same_call(op: OperationRecord, call: tuple[str, int, OpKind, bytes | str]) -> bool:
    """Whether `op` is the call (run, seq_id, kind, payload_digest)."""
    return (op.run, op.seq_id, op.kind, op.payload_digest) == call
