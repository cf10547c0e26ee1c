"""Scheduler records -> public protos, and request digests for idempotency."""

from __future__ import annotations

import hashlib
import math
import uuid

from google.protobuf import timestamp_pb2

from tunemesh_internal.v1 import sampler_pb2
from tunemesh.v1 import operations_pb2, sampling_pb2, sessions_pb2, training_pb2
from tunemesh_scheduler.core.records import OperationRecord, OpKind, OpState, RunRecord, SessionRecord
from tunemesh_scheduler.core.sampling import SamplingSessionRecord

_STATES = {
    OpState.QUEUED: operations_pb2.OPERATION_STATE_QUEUED,
    OpState.RUNNING: operations_pb2.OPERATION_STATE_RUNNING,
    OpState.SUCCEEDED: operations_pb2.OPERATION_STATE_SUCCEEDED,
    OpState.FAILED: operations_pb2.OPERATION_STATE_FAILED,
    OpState.CANCELLED: operations_pb2.OPERATION_STATE_CANCELLED,
}


def timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    # Split before scaling: epoch seconds * 1e9 exceeds float64's exact integers.
    whole = math.floor(seconds)
    nanos = round((seconds - whole) * 1e9)
    return timestamp_pb2.Timestamp(seconds=whole + nanos // 10**9, nanos=nanos % 10**9)


def digest(request) -> bytes:
    """Digest of a request without its request_id and how it asks to be acknowledged:
    equal digests mean the same call."""
    clone = type(request)()
    clone.CopyFrom(request)
    clone.ClearField("request_id")
    clone.ClearField("ack_when_queued")
    return hashlib.sha256(clone.SerializeToString(deterministic=True)).digest()


def session(record: SessionRecord) -> sessions_pb2.Session:
    return sessions_pb2.Session(name=record.name, labels=record.labels, create_time=timestamp(record.create_time))


def run(record: RunRecord) -> training_pb2.TrainingRun:
    return training_pb2.TrainingRun(
        name=record.name,
        session=record.session,
        base_model=record.base_model,
        lora_config=record.lora,
        step=record.step,
        trainer_node=record.node_id,
        create_time=timestamp(record.create_time),
        last_seq_id=record.last_seq_id,
        frozen=not record.node_id,
        user_metadata=dict(record.user_metadata),
        owner=record.tenant,
        last_request_time=timestamp(record.last_request_time or record.create_time),
    )


def operation(record: OperationRecord) -> operations_pb2.Operation:
    op = operations_pb2.Operation(
        name=record.name,
        done=record.state.done,
        state=_STATES[record.state],
        run=record.run,
        seq_id=record.seq_id,
        create_time=timestamp(record.create_time),
        end_time=timestamp(record.end_time),
    )
    if record.error is not None:
        e = record.error
        op.error.CopyFrom(operations_pb2.OperationError(code=e.code, reason=e.reason, message=e.message))
    elif record.state is OpState.SUCCEEDED:
        _set_result(op, record)
    return op


def _set_result(op: operations_pb2.Operation, record: OperationRecord) -> None:
    if record.kind is OpKind.OPTIM_STEP:
        op.optim_step.CopyFrom(record.result)
    elif record.kind in (OpKind.SAVE_STATE, OpKind.SAVE_SAMPLER):
        op.save_checkpoint.CopyFrom(operations_pb2.SaveCheckpointResult(checkpoint=record.result))
    elif record.kind is OpKind.LOAD_STATE:
        op.load_state.CopyFrom(operations_pb2.LoadStateResult(path=record.result.path, step=record.result.step))
    else:
        op.forward_backward.CopyFrom(record.result)


def sampling_session(record: SamplingSessionRecord) -> sampling_pb2.SamplingSession:
    return sampling_pb2.SamplingSession(
        name=record.name, session=record.session, base_model=record.base_model, model_path=record.model_path,
        sampler_node=record.node_id, create_time=timestamp(record.create_time),
    )


def adapter_ref(record: SamplingSessionRecord) -> sampler_pb2.AdapterRef:
    """The weights a sampling session uses: its tenant's checkpoint, or none (base model)."""
    return sampler_pb2.AdapterRef(tenant=record.tenant, path=record.model_path)


def new_sequence_id() -> str:
    """A sampled sequence's id: distinct across the service (random, 128 bits)."""
    return f"seq-{uuid.uuid4().hex}"
