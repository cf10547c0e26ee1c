"""Scheduler records <-> the `tunemesh.internal.v1.scheduler_state` messages etcd holds
(the encoding half of `durable.EtcdRunStore`)."""

from __future__ import annotations

from tunemesh_internal.v1 import scheduler_state_pb2 as pb
from tunemesh.v1 import checkpoints_pb2, operations_pb2, training_pb2, types_pb2
from tunemesh.errors import Code, DataLossError
from tunemesh_scheduler.core.ports import LoadResult
from tunemesh_scheduler.core.work import DataWork, LoadRequest, SaveRequest, StepWork, Work, kind_of
from tunemesh_scheduler.core.records import (
    OperationError, OperationRecord, OpKind, OpState, RunRecord, SessionRecord,
)
from tunemesh_scheduler.core.sampling import SamplingSessionRecord

INLINE_RESULT_BYTES = 512 * 1024  # larger results are not kept across a restart


def encode(record) -> bytes:
    if isinstance(record, SamplingSessionRecord):
        return pb.StoredSamplingSession(
            name=record.name, tenant=record.tenant, session=record.session, base_model=record.base_model,
            model_path=record.model_path, adapter_key=record.adapter_key, create_time=record.create_time,
        ).SerializeToString()
    if isinstance(record, SessionRecord):
        return pb.StoredSession(
            name=record.name, tenant=record.tenant, labels=record.labels, create_time=record.create_time,
            ended=record.ended,
        ).SerializeToString()
    if isinstance(record, RunRecord):
        return pb.StoredRun(
            name=record.name, tenant=record.tenant, session=record.session, base_model=record.base_model,
            lora=record.lora, node_id=record.node_id, create_time=record.create_time, epoch=record.epoch,
            last_seq_id=record.floor[0], step=record.floor[1], request_id=record.request_id,
            snapshot_path=record.snapshot_path, snapshot_seq_id=record.snapshot_seq_id,
            origin_path=record.origin.path if record.origin else "",
            origin_with_optimizer=bool(record.origin and record.origin.load_optimizer_state),
            user_metadata=dict(record.user_metadata),
        ).SerializeToString()
    return _stored_operation(record).SerializeToString()


def _stored_operation(op: OperationRecord) -> pb.StoredOperation:
    state = OpState.QUEUED if op.state is OpState.RUNNING else op.state
    stored = pb.StoredOperation(
        name=op.name, tenant=op.tenant, run=op.run, seq_id=op.seq_id, kind=op.kind.value,
        request_id=op.request_id, payload_digest=_digest_bytes(op.payload_digest), num_tokens=op.num_tokens,
        create_time=op.create_time, state=state.value, end_time=op.end_time or 0.0,
    )
    if op.error is not None:
        stored.error.CopyFrom(operations_pb2.OperationError(
            code=op.error.code, reason=op.error.reason, message=op.error.message))
    if op.state is OpState.SUCCEEDED:
        _set_result(stored, op)
        if stored.ByteSize() > INLINE_RESULT_BYTES:
            stored.ClearField(stored.WhichOneof("result"))
            stored.error.CopyFrom(operations_pb2.OperationError(
                code=int(Code.DATA_LOSS), reason="RESULT_NOT_KEPT",
                message="the result was too large to keep across a scheduler restart; it applied"))
    return stored


def _digest_bytes(digest: bytes | str) -> bytes:
    return digest if isinstance(digest, bytes) else digest.encode()


def stored_payload(payload: Work) -> pb.StoredPayload:
    stored = pb.StoredPayload(kind=kind_of(payload).value)
    match payload:
        case DataWork(backward=True):
            stored.forward_backward.CopyFrom(training_pb2.ForwardBackwardRequest(
                data=payload.data, loss_fn=payload.loss_fn, loss_fn_config=payload.loss_fn_config))
        case DataWork():
            stored.forward.CopyFrom(training_pb2.ForwardRequest(
                data=payload.data, loss_fn=payload.loss_fn, loss_fn_config=payload.loss_fn_config))
        case StepWork():
            stored.optim_step.CopyFrom(training_pb2.OptimStepRequest(adam_params=payload.adam))
        case LoadRequest():
            stored.load.CopyFrom(pb.StoredLoad(path=payload.path, load_optimizer_state=payload.load_optimizer_state))
        case SaveRequest():
            stored.save.CopyFrom(pb.StoredSave(
                path=payload.path, include_optimizer_state=payload.include_optimizer_state,
                ttl_seconds=payload.ttl_seconds, user_metadata=dict(payload.user_metadata),
            ))
    return stored


def _set_result(stored: pb.StoredOperation, op: OperationRecord) -> None:
    result = op.result
    if op.kind is OpKind.OPTIM_STEP:
        stored.optim_step_result.CopyFrom(result)
    elif op.kind in (OpKind.FORWARD, OpKind.FORWARD_BACKWARD):
        stored.forward_backward_result.CopyFrom(result)
    elif op.kind is OpKind.LOAD_STATE:
        stored.load_result.CopyFrom(pb.StoredLoadResult(path=result.path, step=result.step))
    else:
        stored.checkpoint.CopyFrom(result)


def session_record(stored: pb.StoredSession) -> SessionRecord:
    return SessionRecord(
        name=stored.name, tenant=stored.tenant, labels=dict(stored.labels), create_time=stored.create_time,
        last_heartbeat_time=stored.create_time, ended=stored.ended,
    )


def sampling_session_record(stored: pb.StoredSamplingSession) -> SamplingSessionRecord:
    return SamplingSessionRecord(stored.name, stored.tenant, stored.session, stored.base_model, stored.model_path,
                                 stored.adapter_key, "", stored.create_time)


def run_record(stored: pb.StoredRun) -> RunRecord:
    lora = types_pb2.LoraConfig()
    lora.CopyFrom(stored.lora)
    return RunRecord(
        name=stored.name, tenant=stored.tenant, session=stored.session, base_model=stored.base_model, lora=lora,
        node_id=stored.node_id, create_time=stored.create_time, step=stored.step, last_seq_id=stored.last_seq_id,
        floor=(stored.last_seq_id, stored.step),
        epoch=stored.epoch, request_id=stored.request_id, snapshot_path=stored.snapshot_path,
        snapshot_seq_id=stored.snapshot_seq_id,
        origin=LoadRequest(stored.origin_path, stored.origin_with_optimizer) if stored.origin_path else None,
        user_metadata=tuple(sorted(stored.user_metadata.items())),
    )


def operation_record(stored: pb.StoredOperation) -> OperationRecord:
    error = None
    if stored.HasField("error"):
        error = OperationError(stored.error.code, stored.error.reason, stored.error.message)
    return OperationRecord(
        name=stored.name, tenant=stored.tenant, run=stored.run, seq_id=stored.seq_id,
        kind=_enum(OpKind, stored.kind, stored.name),
        request_id=stored.request_id, payload_digest=stored.payload_digest, num_tokens=stored.num_tokens,
        node_id="", create_time=stored.create_time, state=_enum(OpState, stored.state, stored.name),
        end_time=stored.end_time or None, result=_result(stored), error=error,
    )


def _enum(cls, value: str, name: str):
    """`cls(value)`, or DataLossError [CORRUPT_RECORD] for a value this scheduler never writes."""
    try:
        return cls(value)
    except ValueError:
        raise DataLossError("CORRUPT_RECORD", f"stored operation {name!r}: {value!r} is no {cls.__name__}") from None


def payload_of(stored: pb.StoredPayload) -> Work | None:
    """The call of a kept payload (None when it holds none); a call_store reference is
    resolved by the caller (durable.py) and is DataLossError [CORRUPT_RECORD] here."""
    which = stored.WhichOneof("payload")
    if which is None:
        return None
    if which == "call_store":
        raise DataLossError("CORRUPT_RECORD", "a call read from the call store names the call store again")
    if which == "load":
        return LoadRequest(stored.load.path, stored.load.load_optimizer_state)
    if which == "save":
        s = stored.save
        return SaveRequest(s.path, s.include_optimizer_state, s.ttl_seconds, tuple(sorted(s.user_metadata.items())))
    if which == "optim_step":
        return StepWork(stored.optim_step.adam_params)
    call = getattr(stored, which)
    return DataWork(tuple(call.data), call.loss_fn, dict(call.loss_fn_config), backward=which == "forward_backward")


def _result(stored: pb.StoredOperation):
    which = stored.WhichOneof("result")
    if which is None:
        return None
    if which == "load_result":
        return LoadResult(stored.load_result.path, stored.load_result.step)
    message = {"forward_backward_result": types_pb2.ForwardBackwardResult,
               "optim_step_result": types_pb2.OptimStepResult,
               "checkpoint": checkpoints_pb2.Checkpoint}[which]()
    message.CopyFrom(getattr(stored, which))
    return message
