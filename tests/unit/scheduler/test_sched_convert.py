"""convert.py: request digests for idempotency, and records -> public protos."""

from __future__ import annotations

import numpy as np
import pytest

from tunemesh.v1 import operations_pb2, training_pb2, types_pb2
from tunemesh import tensors
from tunemesh_scheduler import convert
from tunemesh_scheduler.core import OperationError, OperationRecord, OpKind, OpState, RunRecord, SessionRecord


def fb_request(request_id="r1", seq_id=1, tokens=(1, 2, 3), loss_fn="cross_entropy", config=None):
    request = training_pb2.ForwardBackwardRequest(run="runs/a", seq_id=seq_id, request_id=request_id, loss_fn=loss_fn)
    d = request.data.add()
    d.model_input.chunks.add().encoded_text.tokens.extend(tokens)
    d.loss_fn_inputs["target_tokens"].CopyFrom(tensors.encode(np.asarray(tokens, np.int64)))
    d.loss_fn_inputs["weights"].CopyFrom(tensors.encode(np.ones(len(tokens), np.float32)))
    for key, value in (config or {}).items():
        request.loss_fn_config[key].number = value
    return request


def test_digest_ignores_request_id_only():
    base = convert.digest(fb_request())
    assert convert.digest(fb_request(request_id="another")) == base
    assert convert.digest(fb_request(request_id="")) == base
    assert convert.digest(fb_request(seq_id=2)) != base
    assert convert.digest(fb_request(tokens=(1, 2, 4))) != base
    assert convert.digest(fb_request(loss_fn="other")) != base
    assert convert.digest(fb_request(config={"a": 1.0})) != convert.digest(fb_request(config={"a": 2.0}))


def test_digest_is_independent_of_map_insertion_order():
    a, b = fb_request(config={"x": 1.0, "y": 2.0}), fb_request(config={"y": 2.0, "x": 1.0})
    assert convert.digest(a) == convert.digest(b)


def test_digest_does_not_modify_the_request_and_distinguishes_types():
    request = fb_request(request_id="keep")
    convert.digest(request)
    assert request.request_id == "keep"
    optim = training_pb2.OptimStepRequest(run="runs/a", seq_id=1, request_id="x")
    optim2 = training_pb2.OptimStepRequest(run="runs/a", seq_id=1, request_id="y")
    assert convert.digest(optim) == convert.digest(optim2)
    optim2.adam_params.learning_rate = 1e-3
    assert convert.digest(optim) != convert.digest(optim2)


def op_record(kind=OpKind.FORWARD_BACKWARD, state=OpState.QUEUED, **kw) -> OperationRecord:
    fields = dict(
        name="operations/1", tenant="t", run="runs/a", seq_id=3, kind=kind, request_id="r",
        payload_digest=b"d", num_tokens=5, node_id="n", create_time=1700000000.25, state=state,
    )
    return OperationRecord(**(fields | kw))


@pytest.mark.parametrize(
    "state, wire",
    [
        (OpState.QUEUED, operations_pb2.OPERATION_STATE_QUEUED),
        (OpState.RUNNING, operations_pb2.OPERATION_STATE_RUNNING),
        (OpState.CANCELLED, operations_pb2.OPERATION_STATE_CANCELLED),
    ],
)
def test_operation_without_result(state, wire):
    op = convert.operation(op_record(state=state, end_time=1700000001.5 if state.done else None))
    assert (op.name, op.run, op.seq_id, op.state, op.done) == ("operations/1", "runs/a", 3, wire, state.done)
    assert op.WhichOneof("result") is None
    assert op.create_time.ToNanoseconds() == 1700000000_250000000
    assert op.HasField("end_time") == state.done


@pytest.mark.parametrize("kind", [OpKind.FORWARD, OpKind.FORWARD_BACKWARD])
def test_succeeded_forward_like_operation_carries_its_result(kind):
    result = types_pb2.ForwardBackwardResult(metrics={"loss:sum": 1.5})
    result.outputs.add().loss_fn_outputs["logprobs"].CopyFrom(tensors.encode(np.float32([-1.0, -0.5])))
    op = convert.operation(op_record(kind=kind, state=OpState.SUCCEEDED, end_time=1700000002.0, result=result))
    assert op.state == operations_pb2.OPERATION_STATE_SUCCEEDED and op.done
    assert op.WhichOneof("result") == "forward_backward"
    assert op.forward_backward == result
    assert op.end_time.ToNanoseconds() == 1700000002_000000000


def test_succeeded_optim_step_carries_its_result():
    result = types_pb2.OptimStepResult(metrics={"step:max": 1.0})
    op = convert.operation(op_record(kind=OpKind.OPTIM_STEP, state=OpState.SUCCEEDED, end_time=2.0, result=result))
    assert op.WhichOneof("result") == "optim_step"
    assert op.optim_step == result


@pytest.mark.parametrize("kind", list(OpKind))
def test_failed_operation_carries_its_error(kind):
    error = OperationError(14, "TRAINER_GONE", "node n left")
    op = convert.operation(op_record(kind=kind, state=OpState.FAILED, end_time=2.0, error=error))
    assert op.state == operations_pb2.OPERATION_STATE_FAILED and op.done
    assert op.WhichOneof("result") == "error"
    assert (op.error.code, op.error.reason, op.error.message) == (14, "TRAINER_GONE", "node n left")


def test_session_and_run():
    session = convert.session(SessionRecord("sessions/s", "t", {"k": "v"}, 10.5, 11.0))
    assert (session.name, dict(session.labels), session.create_time.ToNanoseconds()) == (
        "sessions/s", {"k": "v"}, 10_500_000_000)
    lora = types_pb2.LoraConfig(rank=8, alpha=8.0, train_attn=True)
    run = convert.run(RunRecord("runs/a", "t", "sessions/s", "tiny", lora, "node-1", 5.0, step=2, last_seq_id=7))
    assert (run.name, run.session, run.base_model, run.trainer_node, run.step, run.last_seq_id) == (
        "runs/a", "sessions/s", "tiny", "node-1", 2, 7)
    assert run.lora_config == lora
    assert convert.timestamp(None) is None
