"""EtcdRunStore against a real etcd: round trips, run deletion, batches past etcd's
per-request limits, and an etcd that goes away and comes back."""

from __future__ import annotations

import asyncio
import time

import pytest

from tunemesh.v1 import types_pb2
from tunemesh_common.membership import registry
from tunemesh.errors import UnavailableError
from tunemesh_common.membership.etcd_process import EtcdProcess
from tunemesh_scheduler.core import (
    DataWork,
    OperationError, OperationRecord, OpKind, OpState, RunRecord, SessionRecord,
)
from tunemesh_scheduler.core.ports import StoreWrite
from tunemesh_scheduler.durable import EtcdRunStore, calls_prefix, oplog_prefix

pytestmark = pytest.mark.e2e

KIB = 1024


def _session(name: str = "s1", ended: bool = False) -> SessionRecord:
    return SessionRecord(f"sessions/{name}", "t1", {"who": "alice"}, 10.0, 10.0, ended=ended)


def _run(name: str = "r1", **fields) -> RunRecord:
    fields.setdefault("floor", (fields.get("last_seq_id", 0), fields.get("step", 0)))  # what the store keeps
    return RunRecord(name=f"runs/{name}", tenant="t1", session="sessions/s1", base_model="tiny",
                     lora=types_pb2.LoraConfig(rank=8, alpha=16.0), node_id="node-a", create_time=11.0,
                     **fields)


def _op(run: str, seq_id: int, state: OpState = OpState.QUEUED, **fields) -> OperationRecord:
    return OperationRecord(name=f"operations/{run}-{seq_id}", tenant="t1", run=f"runs/{run}", seq_id=seq_id,
                           kind=OpKind.FORWARD_BACKWARD, request_id=f"req-{seq_id}", payload_digest=b"d",
                           num_tokens=4, node_id="", create_time=12.0, state=state,
                           end_time=13.0 if state.done else None, **fields)


def _call(run: str, seq_id: int, size: int = 16) -> DataWork:
    datum = types_pb2.Datum(loss_fn_inputs={"weights": types_pb2.TensorData(
        dtype=types_pb2.DTYPE_FLOAT32, shape=[size // 4], data=bytes([seq_id % 256]) * size)},
        model_input=types_pb2.ModelInput(chunks=[types_pb2.ModelInputChunk(
            encoded_text=types_pb2.EncodedTextChunk(tokens=[len(run), seq_id]))]))
    return DataWork((datum,), "cross_entropy", {}, backward=True)


async def _keys(client, prefix: bytes) -> list[bytes]:
    return [kv.key for kv in await client.get_prefix(prefix)]


def test_sessions_runs_operations_and_calls_round_trip(etcd_endpoint: str) -> None:
    async def scenario() -> None:
        async with registry.connect(etcd_endpoint) as client:
            store = EtcdRunStore(client)
            bad = OperationError(3, "BAD_DATUM", "empty datum")
            result = types_pb2.ForwardBackwardResult(metrics={"loss": 0.5})
            done = _op("r1", 1, OpState.SUCCEEDED, result=result)
            failed = _op("r1", 2, OpState.FAILED, error=bad)
            queued = _op("r1", 3)
            await store.apply([StoreWrite(_session()), StoreWrite(_run(epoch=2, last_seq_id=1, step=1)),
                               StoreWrite(done), StoreWrite(failed),
                               StoreWrite(queued, payload=_call("r1", 3))])
            state = await store.load()
            assert state.sessions == [_session()]
            assert state.runs == [_run(epoch=2, last_seq_id=1, step=1)]
            assert sorted(state.operations, key=lambda op: op.seq_id) == [done, failed, queued]
            assert state.payloads == {("runs/r1", 3): _call("r1", 3)}
            assert await store.payloads("runs/r1", 0) == {3: _call("r1", 3)}

    asyncio.run(scenario())


def test_deleting_a_run_removes_its_log_and_calls_only(etcd_endpoint: str) -> None:
    async def scenario() -> None:
        async with registry.connect(etcd_endpoint) as client:
            store = EtcdRunStore(client)
            writes = []
            for name in ("ab", "abc", "ab.x"):  # ids that share a prefix with "ab"
                writes += [StoreWrite(_run(name))]
                writes += [StoreWrite(_op(name, seq), payload=_call(name, seq)) for seq in (1, 2)]
            await store.apply(writes)
            await store.apply([StoreWrite(_run("ab"), delete=True)])
            state = await store.load()
            assert sorted(r.name for r in state.runs) == ["runs/ab.x", "runs/abc"]
            assert sorted((op.run, op.seq_id) for op in state.operations) == [
                ("runs/ab.x", 1), ("runs/ab.x", 2), ("runs/abc", 1), ("runs/abc", 2)]
            assert sorted(state.payloads) == sorted((op.run, op.seq_id) for op in state.operations)
            assert await _keys(client, oplog_prefix("runs/ab")) == []
            assert await _keys(client, calls_prefix("runs/ab")) == []

    asyncio.run(scenario())


def test_a_batch_keeps_the_last_change_of_a_key(etcd_endpoint: str) -> None:
    async def scenario() -> None:
        async with registry.connect(etcd_endpoint) as client:
            store = EtcdRunStore(client)
            await store.apply([
                StoreWrite(_session("s1")), StoreWrite(_session("s1", ended=True)),
                StoreWrite(_session("gone")), StoreWrite(_session("gone"), delete=True),
                StoreWrite(_session("back"), delete=True), StoreWrite(_session("back")),
                StoreWrite(_run()), StoreWrite(_op("r1", 1)),
                StoreWrite(_op("r1", 1, OpState.CANCELLED, error=OperationError(1, "CANCELLED", "by you"))),
            ])
            state = await store.load()
            assert {s.name: s.ended for s in state.sessions} == {"sessions/s1": True, "sessions/back": False}
            assert [(op.seq_id, op.state) for op in state.operations] == [(1, OpState.CANCELLED)]

    asyncio.run(scenario())


def test_a_batch_past_etcds_request_limits_is_split_and_fully_written(etcd_endpoint: str) -> None:
    async def scenario() -> None:
        async with registry.connect(etcd_endpoint) as client:
            store = EtcdRunStore(client)
            sizes = {seq: (300 * KIB if seq <= 5 else 16) for seq in range(1, 301)}  # 300 ops, 1.5 MiB
            calls = {seq: _call("r1", seq, size) for seq, size in sizes.items()}
            await store.apply([StoreWrite(_run())] + [
                StoreWrite(_op("r1", seq), payload=call) for seq, call in calls.items()])
            assert len(await _keys(client, oplog_prefix("runs/r1"))) == 300
            assert await store.payloads("runs/r1", 0) == calls
            assert len((await store.load()).operations) == 300

    asyncio.run(scenario())


def test_load_reads_kept_calls_past_four_mib(etcd_endpoint: str) -> None:
    async def scenario() -> None:
        async with registry.connect(etcd_endpoint) as client:
            store = EtcdRunStore(client)
            await store.apply([StoreWrite(_run())])
            for seq in range(1, 17):  # 16 x 400 KiB: each call under INLINE_PAYLOAD_BYTES
                await store.apply([StoreWrite(_op("r1", seq), payload=_call("r1", seq, 400 * KIB))])
            assert len((await store.load()).payloads) == 16

    asyncio.run(scenario())


def test_a_result_over_the_request_limit_does_not_wedge_the_store(etcd_endpoint: str) -> None:
    async def scenario() -> None:
        async with registry.connect(etcd_endpoint) as client:
            store = EtcdRunStore(client)
            output = types_pb2.DatumOutput(loss_fn_outputs={"logprobs": types_pb2.TensorData(
                dtype=types_pb2.DTYPE_FLOAT32, shape=[512 * KIB], data=b"\0" * 2048 * KIB)})
            huge = types_pb2.ForwardBackwardResult(outputs=[output])
            await store.apply([StoreWrite(_run()), StoreWrite(_op("r1", 1, OpState.SUCCEEDED, result=huge))])
            (op,) = (await store.load()).operations
            assert op.state is OpState.SUCCEEDED and op.result is None  # applied; its result not kept
            assert op.error.reason == "RESULT_NOT_KEPT"

    asyncio.run(scenario())


def test_a_run_deleted_in_the_batch_that_logged_its_operation_is_gone(etcd_endpoint: str) -> None:
    async def scenario() -> None:
        async with registry.connect(etcd_endpoint) as client:
            store = EtcdRunStore(client)
            await store.apply([StoreWrite(_run())])
            await store.apply([StoreWrite(_op("r1", 1), payload=_call("r1", 1)),
                               StoreWrite(_op("r1", 1, OpState.SUCCEEDED,
                                              result=types_pb2.ForwardBackwardResult())),
                               StoreWrite(_run(), delete=True)])
            assert await _keys(client, f"{registry.ROOT}/".encode()) == []

    asyncio.run(scenario())


def test_a_trim_in_the_batch_that_kept_the_call_drops_it(etcd_endpoint: str) -> None:
    async def scenario() -> None:
        async with registry.connect(etcd_endpoint) as client:
            store = EtcdRunStore(client)
            await store.apply([StoreWrite(_run())])
            await store.apply([StoreWrite(_op("r1", 5), payload=_call("r1", 5)),
                               StoreWrite(_run(snapshot_seq_id=5), trim_through=5)])
            assert await store.payloads("runs/r1", 0) == {}

    asyncio.run(scenario())


def test_load_and_apply_answer_unavailable_while_etcd_is_down(etcd_process: EtcdProcess) -> None:
    async def scenario() -> None:
        async with registry.connect(etcd_process.endpoint, timeout=2.0) as client:
            store = EtcdRunStore(client)
            await store.apply([StoreWrite(_session("before"))])
            etcd_process.kill()
            with pytest.raises(UnavailableError) as info:
                await store.load()
            assert info.value.reason == "ETCD_UNAVAILABLE"
            with pytest.raises(UnavailableError) as info:
                await store.apply([StoreWrite(_session("during"))])
            assert info.value.reason == "ETCD_UNAVAILABLE"
            etcd_process.start()
            await _until_applied(store, [StoreWrite(_session("after"))], timeout_s=15.0)
            names = sorted(s.name for s in (await store.load()).sessions)
            assert names == ["sessions/after", "sessions/before"]

    asyncio.run(scenario())


async def _until_applied(store: EtcdRunStore, writes, timeout_s: float) -> None:
    """Apply `writes`, retrying while the client reconnects to a restarted etcd."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await store.apply(writes)
        except UnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
