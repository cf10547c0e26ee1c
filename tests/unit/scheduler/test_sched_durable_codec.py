"""The etcd codec of the scheduler's durable state: records to `scheduler_state` protos and
back, operations' calls kept apart (and dropped when too large), and the key layout."""

import asyncio
import dataclasses

import pytest
from aetcd.client import Transactions
from aetcd.transactions import Put

from tunemesh_internal.v1 import scheduler_state_pb2 as pb
from tunemesh.v1 import checkpoints_pb2, types_pb2
from tunemesh.errors import Code
from tunemesh_scheduler import durable, durable_codec
from tunemesh_scheduler.core import (
    DataWork, LoadRequest, LoadResult, OperationError, OperationRecord, OpKind, OpState, RunRecord,
    SaveRequest, SessionRecord, StepWork,
)
from tunemesh_scheduler.core.ports import StoreWrite


class FakeEtcd:
    """The slice of aetcd.Client that EtcdRunStore uses, over a dict (no server)."""

    def __init__(self) -> None:
        self.transactions = Transactions()
        self.kv: dict[bytes, bytes] = {}

    async def transaction(self, compare, success, failure):
        assert not compare  # unfenced in these tests
        for op in success:
            if isinstance(op, Put):
                self.kv[op.key] = op.value
            else:
                end = op.range_end
                for key in [k for k in self.kv if (k == op.key if end is None else op.key <= k < end)]:
                    del self.kv[key]
        return True, []

    async def get_range(self, start: bytes, end: bytes):
        return [_KV(k, v) for k, v in sorted(self.kv.items()) if start <= k < end]

    async def get_prefix(self, prefix: bytes):
        return [_KV(k, v) for k, v in sorted(self.kv.items()) if k.startswith(prefix)]


@dataclasses.dataclass
class _KV:
    key: bytes
    value: bytes


def _tensor(n: int) -> types_pb2.TensorData:
    return types_pb2.TensorData(dtype=types_pb2.DTYPE_FLOAT32, shape=[n // 4], data=b"\x01" * n)


def _datum(n: int = 16) -> types_pb2.Datum:
    chunk = types_pb2.ModelInputChunk(encoded_text=types_pb2.EncodedTextChunk(tokens=[1, 2, 3]))
    return types_pb2.Datum(model_input=types_pb2.ModelInput(chunks=[chunk]),
                           loss_fn_inputs={"weights": _tensor(n)})


def _op(kind: OpKind, state: OpState = OpState.QUEUED, seq_id: int = 7, **fields) -> OperationRecord:
    return OperationRecord(
        name=f"operations/o{seq_id}", tenant="t1", run="runs/r1", seq_id=seq_id, kind=kind,
        request_id=f"req-{seq_id}", payload_digest=b"\x00\xffdigest", num_tokens=12, node_id="",
        create_time=1000.5, state=state, end_time=1001.25 if state.done else None, **fields)


def _decoded(record):
    stored = durable_codec.encode(record)
    if isinstance(record, SessionRecord):
        return durable_codec.session_record(pb.StoredSession.FromString(stored))
    if isinstance(record, RunRecord):
        return durable_codec.run_record(pb.StoredRun.FromString(stored))
    return durable_codec.operation_record(pb.StoredOperation.FromString(stored))


# ---- records ----------------------------------------------------------------------------


def test_a_session_round_trips():
    session = SessionRecord("sessions/s1", "t1", {"who": "alice", "team": "x"}, 10.5, 10.5, ended=True)
    assert _decoded(session) == session


def test_a_session_comes_back_with_its_heartbeat_at_creation():
    session = SessionRecord("sessions/s1", "t1", {}, create_time=10.0, last_heartbeat_time=99.0)
    assert _decoded(session) == dataclasses.replace(session, last_heartbeat_time=10.0)


def test_a_run_round_trips_with_its_lora_floor_epoch_origin_and_user_metadata():
    lora = types_pb2.LoraConfig(rank=16, alpha=32.0, train_attn=True, train_mlp=True, seed=7)
    run = RunRecord(name="runs/r1", tenant="t1", session="sessions/s1", base_model="tiny-dense", lora=lora,
                    node_id="node-a", create_time=12.5, step=9, last_seq_id=21, epoch=3,
                    request_id="create-1", origin=LoadRequest("tenants/t1/ckpt/1", True),
                    snapshot_path="tenants/t1/snap/2", snapshot_seq_id=20, floor=(21, 9),
                    user_metadata=(("a", "1"), ("renderer_name", "role_colon")))
    back = _decoded(run)
    assert back == run
    assert isinstance(back.lora, types_pb2.LoraConfig)
    assert _decoded(dataclasses.replace(run, origin=None)).origin is None
    # the store keeps the floor, not the live counters (they may run ahead of the logged operations)
    ahead = _decoded(dataclasses.replace(run, last_seq_id=30, step=12))
    assert (ahead.last_seq_id, ahead.step, ahead.floor) == (21, 9, (21, 9))


RESULTS = [
    (OpKind.FORWARD, types_pb2.ForwardBackwardResult(
        outputs=[types_pb2.DatumOutput(loss_fn_outputs={"logprobs": _tensor(8)})], metrics={"loss": 0.5})),
    (OpKind.FORWARD_BACKWARD, types_pb2.ForwardBackwardResult(
        outputs=[types_pb2.DatumOutput(loss_fn_outputs={"logprobs": _tensor(8)})], metrics={"loss": 1.5})),
    (OpKind.OPTIM_STEP, types_pb2.OptimStepResult(metrics={"grad_norm": 0.25})),
    (OpKind.SAVE_STATE, checkpoints_pb2.Checkpoint(
        path="tenants/t1/ckpt/1", run="runs/r1", step=4, has_optimizer_state=True, user_metadata={"k": "v"})),
    (OpKind.SAVE_SAMPLER, checkpoints_pb2.Checkpoint(path="tenants/t1/sampler/1", run="runs/r1", step=4)),
    (OpKind.LOAD_STATE, LoadResult("tenants/t1/ckpt/1", 4)),
]


@pytest.mark.parametrize(("kind", "result"), RESULTS, ids=[k.value for k, _ in RESULTS])
def test_a_succeeded_operation_round_trips_with_its_result(kind, result):
    op = _op(kind, OpState.SUCCEEDED, result=result)
    back = _decoded(op)
    assert back == op
    assert type(back.result) is type(result)


@pytest.mark.parametrize("state", [OpState.FAILED, OpState.CANCELLED])
def test_a_failed_or_cancelled_operation_round_trips_with_its_error(state):
    error = OperationError(int(Code.INVALID_ARGUMENT), "BAD_DATUM", "datum 3 is empty")
    op = _op(OpKind.FORWARD_BACKWARD, state, error=error)
    back = _decoded(op)
    assert back == op and back.result is None


@pytest.mark.parametrize("kind", list(OpKind))
def test_an_unfinished_operation_round_trips_without_its_call(kind):
    op = _op(kind, payload=("the call",), epoch=2)
    assert _decoded(op) == dataclasses.replace(op, payload=None, epoch=0)


def test_a_running_operation_is_stored_as_queued():
    op = _op(OpKind.OPTIM_STEP, OpState.RUNNING)
    assert _decoded(op) == dataclasses.replace(op, state=OpState.QUEUED)


def test_a_text_digest_comes_back_as_its_bytes():
    op = dataclasses.replace(_op(OpKind.FORWARD), payload_digest="abc")
    assert _decoded(op).payload_digest == b"abc"


# ---- calls, kept apart ------------------------------------------------------------------

ADAM = types_pb2.AdamParams(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01)
CALLS = [
    (OpKind.FORWARD, DataWork((_datum(),), "cross_entropy", {}, backward=False)),
    (OpKind.FORWARD_BACKWARD, DataWork((_datum(), _datum(8)), "importance_sampling",
                                       {"clip": types_pb2.LossConfigValue(number=0.2)}, backward=True)),
    (OpKind.OPTIM_STEP, StepWork(ADAM)),
    (OpKind.SAVE_STATE, SaveRequest("tenants/t1/ckpt/a", True, 3600, (("a", "1"), ("b", "2")))),
    (OpKind.SAVE_SAMPLER, SaveRequest("tenants/t1/sampler/a", False)),
    (OpKind.LOAD_STATE, LoadRequest("tenants/t1/ckpt/a", True)),
]


def test_every_kind_of_call_is_kept_and_loaded_back():
    async def main():
        etcd = FakeEtcd()
        store = durable.EtcdRunStore(etcd)
        ops = [_op(kind, seq_id=seq) for seq, (kind, _) in enumerate(CALLS, start=1)]
        await store.apply([StoreWrite(op, payload=call) for op, (_, call) in zip(ops, CALLS)])
        state = await store.load()
        assert state.payloads == {("runs/r1", seq): call for seq, (_, call) in enumerate(CALLS, start=1)}
        assert sorted(op.seq_id for op in state.operations) == [1, 2, 3, 4, 5, 6]
        for seq, (_, call) in enumerate(CALLS, start=1):
            assert type(state.payloads[("runs/r1", seq)]) is type(call)
        assert await store.payloads("runs/r1", 4) == {5: CALLS[4][1], 6: CALLS[5][1]}

    asyncio.run(main())


def test_a_call_over_the_inline_limit_is_dropped_and_its_record_kept():
    async def main():
        store = durable.EtcdRunStore(FakeEtcd())
        big = DataWork((_datum(durable.INLINE_PAYLOAD_BYTES + 1),), "cross_entropy", {}, backward=True)
        small = DataWork((_datum(),), "cross_entropy", {}, backward=True)
        first, second = _op(OpKind.FORWARD_BACKWARD, seq_id=1), _op(OpKind.FORWARD_BACKWARD, seq_id=2)
        await store.apply([StoreWrite(first, payload=big), StoreWrite(second, payload=small)])
        state = await store.load()
        assert sorted(state.operations, key=lambda op: op.seq_id) == [first, second]
        assert state.payloads == {("runs/r1", 2): small}

    asyncio.run(main())


def test_a_trim_drops_the_kept_calls_up_to_its_seq_id():
    async def main():
        store = durable.EtcdRunStore(FakeEtcd())
        run = RunRecord("runs/r1", "t1", "sessions/s1", "tiny", types_pb2.LoraConfig(rank=8), "node-a", 1.0)
        ops = [_op(OpKind.OPTIM_STEP, seq_id=seq) for seq in (1, 2, 3)]
        await store.apply([StoreWrite(run)] + [StoreWrite(op, payload=CALLS[2][1]) for op in ops])
        await store.apply([StoreWrite(run, trim_through=2)])
        assert set((await store.load()).payloads) == {("runs/r1", 3)}

    asyncio.run(main())


# ---- keys -------------------------------------------------------------------------------


def test_keys_lay_out_sessions_runs_and_each_runs_log_by_seq_id():
    session = SessionRecord("sessions/s1", "t1", {}, 1.0, 1.0)
    run = RunRecord("runs/r1", "t1", "sessions/s1", "tiny", None, "node-a", 1.0)
    assert durable.key_of(session) == b"/tunemesh/sessions/s1"
    assert durable.key_of(run) == b"/tunemesh/runs/r1"
    assert durable.key_of(_op(OpKind.FORWARD, seq_id=7)) == b"/tunemesh/oplog/r1/00000000000000000007"
    assert durable.oplog_prefix("runs/r1") == b"/tunemesh/oplog/r1/"
    assert durable.calls_prefix("runs/r1") == b"/tunemesh/calls/r1/"
    keys = [durable.key_of(_op(OpKind.FORWARD, seq_id=seq)) for seq in (2, 10, 9, 100)]
    assert sorted(keys) == [keys[0], keys[2], keys[1], keys[3]]  # byte order is seq_id order
    other = dataclasses.replace(_op(OpKind.FORWARD), run="runs/r10")
    assert not durable.key_of(other).startswith(durable.oplog_prefix("runs/r1"))
