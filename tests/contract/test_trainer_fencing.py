"""Fencing and exactly-once application on a real TrainerServicer (tiny-dense torch engine,
in-process grpc.aio server, real checkpoint service on a temporary root).

A fenced call carries its run's epoch and the operation's seq_id: a re-sent seq_id gets
the first application's outcome and is not applied again; a call from a lower epoch than
the adapter's is refused STALE_EPOCH. Adapters are compared by the engine's digest
(weights, accumulated grads, optimizer state and step count).
"""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import numpy as np
import pytest

from tunemesh_internal.v1 import checkpoint_pb2_grpc, trainer_pb2
from tunemesh_checkpoint.catalog import CheckpointCatalog
from tunemesh_checkpoint.server import StorageServicer
from tunemesh_checkpoint.store import FilesystemStore
from tunemesh_common.service import rpc
from tunemesh_common.service.host import build_server
from tunemesh_common.checkpoints.client import CheckpointStorageClient
from tunemesh_common.models import TINY_DENSE
from tunemesh_trainer.core import TrainerCore
from tunemesh_trainer.server import TrainerServicer

# Helpers and the module-scoped model / engine / loop fixtures of the servicer tests.
from test_trainer_servicer import ADAM, LORA, Served, datum, logprobs_of, status_of
from test_trainer_servicer import engine, loop, model  # noqa: F401 - fixtures

FB, FWD, OPTIM = trainer_pb2.ITEM_KIND_FORWARD_BACKWARD, trainer_pb2.ITEM_KIND_FORWARD, trainer_pb2.ITEM_KIND_OPTIM_STEP
PROBE = [40, 41, 42, 43]
TENANT = "tenant-a"
STALE = (grpc.StatusCode.FAILED_PRECONDITION, "STALE_EPOCH")


async def _start_storage(root):
    server, _ = build_server(rpc.trusted_tenant)
    catalog = CheckpointCatalog(FilesystemStore(root, fsync=False))
    checkpoint_pb2_grpc.add_CheckpointStorageServiceServicer_to_server(
        StorageServicer(catalog, 64 << 10, 1 << 30), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, CheckpointStorageClient(f"127.0.0.1:{port}", timeout_s=60)


@pytest.fixture(scope="module")
def storage(loop, tmp_path_factory):  # noqa: F811 - `loop` is the imported fixture
    server, client = loop.run(_start_storage(tmp_path_factory.mktemp("fencing_checkpoints")))
    yield client
    loop.run(client.close())
    loop.run(server.stop(None))


class _SlowBatches:
    """The engine, with each run_batch delayed: keeps a first application in flight."""

    def __init__(self, engine, delay_s: float) -> None:  # noqa: F811
        self._engine, self._delay_s = engine, delay_s

    def run_batch(self, items):
        time.sleep(self._delay_s)
        return self._engine.run_batch(items)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def _serve(loop, engine, storage, node_id="node-f"):  # noqa: F811
    core = TrainerCore(engine, 8)
    servicer = TrainerServicer(node_id, "127.0.0.1:0", checkpoints=storage)
    served = Served(loop, servicer)
    servicer.attach(core, {})
    return served, core


@pytest.fixture()
def node(loop, engine, storage):  # noqa: F811
    """A fresh servicer (fresh ledger) over the module's engine; its adapters go afterwards."""
    served, core = _serve(loop, engine, storage)
    yield served
    served.close()
    core.close()
    for adapter_id in engine.adapter_ids():
        engine.delete_adapter(adapter_id)


def create(stub, adapter_id: str, epoch: int) -> None:
    stub.CreateAdapter(trainer_pb2.CreateAdapterRequest(
        adapter_id=adapter_id, base_model=TINY_DENSE, lora_config=LORA, epoch=epoch), timeout=30)


def fb(item_id, adapter_id, seq_id=0, epoch=0, kind=FB) -> trainer_pb2.BatchItem:
    return trainer_pb2.BatchItem(item_id=item_id, adapter_id=adapter_id, kind=kind, data=[datum(PROBE)],
                                 loss_fn="cross_entropy", seq_id=seq_id, epoch=epoch)


def optim(item_id, adapter_id, seq_id=0, epoch=0) -> trainer_pb2.BatchItem:
    return trainer_pb2.BatchItem(item_id=item_id, adapter_id=adapter_id, kind=OPTIM, adam_params=ADAM,
                                 seq_id=seq_id, epoch=epoch)


def run_batch(stub, *items, timeout=60) -> list[trainer_pb2.BatchItemResult]:
    return list(stub.RunBatch(trainer_pb2.RunBatchRequest(items=items), timeout=timeout).results)


def probe_logprobs(stub, adapter_id: str) -> np.ndarray:
    (result,) = run_batch(stub, fb("probe", adapter_id, kind=FWD))
    return logprobs_of(result)[0]


def listed(stub) -> dict[str, tuple[int, int]]:
    adapters = stub.ListAdapters(trainer_pb2.ListAdaptersRequest(), timeout=10).adapters
    return {a.adapter_id: (a.epoch, a.applied_seq_id) for a in adapters}


def adopt(stub, adapter_id: str, epoch: int) -> int:
    request = trainer_pb2.AdoptAdapterRequest(adapter_id=adapter_id, epoch=epoch)
    return stub.AdoptAdapter(request, timeout=10).applied_seq_id


def assert_same_outcome(repeat: trainer_pb2.BatchItemResult, first: trainer_pb2.BatchItemResult, item_id: str):
    """Equal to `first` bit for bit (tensor bytes included), but for the echoed item id."""
    assert repeat.item_id == item_id != first.item_id
    assert repeat.WhichOneof("outcome") == first.WhichOneof("outcome") != "error", repeat.error
    renamed = trainer_pb2.BatchItemResult()
    renamed.CopyFrom(repeat)
    renamed.item_id = first.item_id
    assert renamed == first


# ---- RunBatch ---------------------------------------------------------------------------


def test_a_resent_batch_returns_the_first_results_and_trains_once(node, engine):  # noqa: F811
    stub = node.stub
    create(stub, "runs/a", 1)
    create(stub, "runs/twin", 1)  # same LoRA seed: starts identical to runs/a
    assert engine.adapter_digest("runs/a") == engine.adapter_digest("runs/twin")

    first = run_batch(stub, fb("fb-1", "runs/a", 1, 1), optim("opt-1", "runs/a", 2, 1))
    again = run_batch(stub, fb("fb-1b", "runs/a", 1, 1), optim("opt-1b", "runs/a", 2, 1))
    assert [r.item_id for r in again] == ["fb-1b", "opt-1b"]
    assert_same_outcome(again[0], first[0], "fb-1b")
    assert_same_outcome(again[1], first[1], "opt-1b")
    np.testing.assert_array_equal(logprobs_of(again[0])[0], logprobs_of(first[0])[0])
    assert again[0].result.metrics["loss:sum"] == first[0].result.metrics["loss:sum"]
    assert again[1].optim_step.metrics["step:max"] == 1  # a second step would report 2

    once = run_batch(stub, fb("fb-t", "runs/twin", 1, 1), optim("opt-t", "runs/twin", 2, 1))
    np.testing.assert_array_equal(logprobs_of(once[0])[0], logprobs_of(first[0])[0])
    assert engine.adapter_digest("runs/a") == engine.adapter_digest("runs/twin")
    np.testing.assert_array_equal(probe_logprobs(stub, "runs/a"), probe_logprobs(stub, "runs/twin"))
    assert listed(stub) == {"runs/a": (1, 2), "runs/twin": (1, 2)}

    # The comparison can fail: a genuine second application (new seq_ids) shows up in it.
    second = run_batch(stub, fb("fb-2", "runs/a", 3, 1), optim("opt-2", "runs/a", 4, 1))
    assert second[1].optim_step.metrics["step:max"] == 2
    assert not np.array_equal(logprobs_of(second[0])[0], logprobs_of(first[0])[0])
    assert engine.adapter_digest("runs/a") != engine.adapter_digest("runs/twin")


def test_a_repeat_within_one_batch_is_applied_once(node, engine):  # noqa: F811
    stub = node.stub
    create(stub, "runs/a", 1)
    create(stub, "runs/twin", 1)
    results = run_batch(stub, fb("fb-1", "runs/a", 1, 1), fb("fb-1b", "runs/a", 1, 1))
    assert_same_outcome(results[1], results[0], "fb-1b")
    run_batch(stub, fb("fb-t", "runs/twin", 1, 1))
    assert engine.adapter_digest("runs/a") == engine.adapter_digest("runs/twin")  # grads accumulated once


def test_a_repeat_sent_while_the_first_runs_waits_for_its_outcome(loop, engine, storage):  # noqa: F811
    served, core = _serve(loop, _SlowBatches(engine, 0.5), storage, "node-slow")
    try:
        stub = served.stub
        create(stub, "runs/a", 1)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(run_batch, stub, fb("fb-1", "runs/a", 1, 1))
            time.sleep(0.2)  # the first is in the engine now
            repeat = pool.submit(run_batch, stub, fb("fb-1b", "runs/a", 1, 1))
            (first_result,), (repeat_result,) = first.result(30), repeat.result(30)
        assert_same_outcome(repeat_result, first_result, "fb-1b")
    finally:
        served.close()
        core.close()
        for adapter_id in engine.adapter_ids():
            engine.delete_adapter(adapter_id)


def test_a_repeat_whose_caller_gave_up_does_not_lose_the_outcome(loop, engine, storage):  # noqa: F811
    """A repeat that times out while the first application runs must not spoil the
    recorded outcome for the repeats that come after it."""
    served, core = _serve(loop, _SlowBatches(engine, 1.0), storage, "node-slow")
    try:
        stub = served.stub
        create(stub, "runs/a", 1)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(run_batch, stub, fb("fb-1", "runs/a", 1, 1))
            time.sleep(0.2)
            impatient = lambda: run_batch(stub, fb("fb-1b", "runs/a", 1, 1), timeout=0.3)  # noqa: E731
            with pytest.raises(grpc.RpcError) as info:
                impatient()
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            (first_result,) = first.result(30)
        (later,) = run_batch(stub, fb("fb-1c", "runs/a", 1, 1), timeout=5)
        assert_same_outcome(later, first_result, "fb-1c")
    finally:
        served.close()
        core.close()
        for adapter_id in engine.adapter_ids():
            engine.delete_adapter(adapter_id)


def test_a_stale_item_is_refused_alone(node, engine):  # noqa: F811
    stub = node.stub
    create(stub, "runs/a", 1)
    create(stub, "runs/b", 1)
    assert adopt(stub, "runs/a", 2) == 0
    before = engine.adapter_digest("runs/a")
    stale, other, current = run_batch(
        stub, fb("stale", "runs/a", 1, 1), fb("other", "runs/b", 1, 1), fb("current", "runs/a", 1, 2))
    assert stale.item_id == "stale" and stale.WhichOneof("outcome") == "error"
    assert (stale.error.code, stale.error.reason) == (grpc.StatusCode.FAILED_PRECONDITION.value[0], "STALE_EPOCH")
    assert other.item_id == "other" and logprobs_of(other)[0].shape == (len(PROBE),)
    # The refused item took nothing: seq_id 1 at epoch 2 was still fresh and ran.
    np.testing.assert_array_equal(logprobs_of(current)[0], logprobs_of(other)[0])
    assert engine.adapter_digest("runs/a") != before
    assert listed(stub) == {"runs/a": (2, 1), "runs/b": (1, 1)}
    # A stale optim step is refused too, and steps nothing.
    (refused,) = run_batch(stub, optim("stale-opt", "runs/a", 2, 1))
    assert refused.error.reason == "STALE_EPOCH"
    (step,) = run_batch(stub, optim("opt", "runs/a", 2, 2))
    assert step.optim_step.metrics["step:max"] == 1


# ---- AdoptAdapter / ListAdapters --------------------------------------------------------


def test_adopt_adapter_reports_applied_seq_id_and_fences(node):
    stub = node.stub
    create(stub, "runs/a", 1)
    run_batch(stub, fb("fb-1", "runs/a", 1, 1), optim("opt-1", "runs/a", 2, 1))
    run_batch(stub, fb("fb-2", "runs/a", 3, 1))
    assert adopt(stub, "runs/a", 3) == 3
    assert adopt(stub, "runs/a", 3) == 3  # idempotent at the same epoch
    assert status_of(lambda: adopt(stub, "runs/a", 2)) == STALE
    assert status_of(lambda: adopt(stub, "runs/zz", 1)) == (grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND")
    assert listed(stub) == {"runs/a": (3, 3)}


def test_list_adapters_follows_create_and_delete(node):
    stub = node.stub
    assert listed(stub) == {}
    create(stub, "runs/b", 4)
    create(stub, "runs/a", 0)  # unfenced run
    run_batch(stub, fb("fb-b", "runs/b", 7, 4))
    adapters = stub.ListAdapters(trainer_pb2.ListAdaptersRequest(), timeout=10).adapters
    assert [(a.adapter_id, a.epoch, a.applied_seq_id) for a in adapters] == [("runs/a", 0, 0), ("runs/b", 4, 7)]
    stub.DeleteAdapter(trainer_pb2.DeleteAdapterRequest(adapter_id="runs/b"), timeout=10)
    assert listed(stub) == {"runs/a": (0, 0)}
    create(stub, "runs/b", 5)  # re-created: its history starts over
    assert listed(stub) == {"runs/a": (0, 0), "runs/b": (5, 0)}
    (fresh,) = run_batch(stub, fb("fb-b2", "runs/b", 7, 5))
    assert fresh.WhichOneof("outcome") == "result"
    assert listed(stub)["runs/b"] == (5, 7)


def test_a_create_that_fails_keeps_the_ledger_entry(node):
    stub = node.stub
    create(stub, "runs/a", 3)
    run_batch(stub, fb("fb-1", "runs/a", 1, 3))
    assert status_of(lambda: create(stub, "runs/a", 1)) == (grpc.StatusCode.ALREADY_EXISTS, "ADAPTER_EXISTS")
    assert listed(stub) == {"runs/a": (3, 1)}


# ---- SaveAdapter / LoadAdapter ----------------------------------------------------------


def _save(stub, name: str, seq_id: int, epoch: int, adapter_id: str = "runs/a"):
    request = trainer_pb2.SaveAdapterRequest(
        adapter_id=adapter_id, tenant=TENANT, path=f"tunemesh://runs/r1/state/{name}",
        include_optimizer_state=True, seq_id=seq_id, epoch=epoch)
    return stub.SaveAdapter(request, timeout=60).checkpoint


def _load(stub, name: str, seq_id: int, epoch: int, adapter_id: str = "runs/a") -> int:
    request = trainer_pb2.LoadAdapterRequest(
        adapter_id=adapter_id, tenant=TENANT, path=f"tunemesh://runs/r1/state/{name}",
        load_optimizer_state=True, seq_id=seq_id, epoch=epoch)
    return stub.LoadAdapter(request, timeout=60).step


def test_a_repeated_fenced_save_returns_the_same_checkpoint(node):
    stub = node.stub
    create(stub, "runs/a", 1)
    run_batch(stub, fb("fb-1", "runs/a", 1, 1), optim("opt-1", "runs/a", 2, 1))
    saved = _save(stub, "s1", 3, 1)
    assert (saved.path, saved.step, saved.has_optimizer_state) == ("tunemesh://runs/r1/state/s1", 1, True)
    assert _save(stub, "s1", 3, 1) == saved  # same create_time: not written twice
    # Without the seq_id the same save is a second write, and the name is taken.
    assert status_of(lambda: _save(stub, "s1", 0, 0)) == (grpc.StatusCode.ALREADY_EXISTS, "CHECKPOINT_EXISTS")
    adopt(stub, "runs/a", 2)
    assert status_of(lambda: _save(stub, "s2", 4, 1)) == STALE
    assert listed(stub) == {"runs/a": (2, 3)}


def test_a_repeated_fenced_save_repeats_its_error(node):
    stub = node.stub
    create(stub, "runs/a", 1)
    _save(stub, "taken", 0, 0)
    failed = (grpc.StatusCode.ALREADY_EXISTS, "CHECKPOINT_EXISTS")
    assert status_of(lambda: _save(stub, "taken", 1, 1)) == failed
    assert listed(stub) == {"runs/a": (1, 0)}  # a save that raised changed nothing: its seq_id is free again
    assert status_of(lambda: _save(stub, "taken", 1, 1)) == failed  # run again, the same answer


def test_a_repeated_fenced_load_is_not_applied_again(node, engine):  # noqa: F811
    stub = node.stub
    create(stub, "runs/a", 1)
    run_batch(stub, fb("fb-1", "runs/a", 1, 1), optim("opt-1", "runs/a", 2, 1))
    _save(stub, "load-1", 3, 1)
    saved_digest = engine.adapter_digest("runs/a")
    run_batch(stub, fb("fb-2", "runs/a", 4, 1), optim("opt-2", "runs/a", 5, 1))
    assert _load(stub, "load-1", 6, 1) == 1
    assert engine.adapter_digest("runs/a") == saved_digest
    run_batch(stub, fb("fb-3", "runs/a", 7, 1), optim("opt-3", "runs/a", 8, 1))
    trained = engine.adapter_digest("runs/a")
    assert trained != saved_digest
    assert _load(stub, "load-1", 6, 1) == 1  # the first load's answer ...
    assert engine.adapter_digest("runs/a") == trained  # ... without loading again
    assert _load(stub, "load-1", 9, 1) == 1  # a new seq_id does load
    assert engine.adapter_digest("runs/a") == saved_digest
    adopt(stub, "runs/a", 5)
    assert status_of(lambda: _load(stub, "load-1", 10, 4)) == STALE


# ---- RestoreAdapter (a run moving here) -------------------------------------------------


def _restore(stub, name: str, epoch: int, adapter_id: str = "runs/a", lora=LORA) -> int:
    request = trainer_pb2.RestoreAdapterRequest(
        adapter_id=adapter_id, base_model=TINY_DENSE, lora_config=lora, epoch=epoch, tenant=TENANT,
        path=f"tunemesh://runs/r1/state/{name}" if name else "", load_optimizer_state=bool(name))
    return stub.RestoreAdapter(request, timeout=60).step


def test_restore_rebuilds_an_adapter_replacing_a_stale_copy(node, loop, engine, storage):  # noqa: F811
    stub = node.stub
    create(stub, "runs/a", 1)
    run_batch(stub, fb("fb-1", "runs/a", 1, 1), optim("opt-1", "runs/a", 2, 1))
    _save(stub, "restore-1", 3, 1)
    saved_digest = engine.adapter_digest("runs/a")
    run_batch(stub, fb("fb-2", "runs/a", 4, 1), optim("opt-2", "runs/a", 5, 1))  # the copy goes stale
    assert _restore(stub, "restore-1", 2) == 1
    assert engine.adapter_digest("runs/a") == saved_digest
    assert listed(stub) == {"runs/a": (2, 0)}  # a new history at the new epoch
    assert status_of(lambda: _restore(stub, "", 1)) == STALE  # a deposed mover's restore
    assert engine.adapter_digest("runs/a") == saved_digest
    # On another node (a fresh ledger) that holds no copy: the same adapter, bit for bit.
    node.close()
    engine.delete_adapter("runs/a")
    other, core = _serve(loop, engine, storage, node_id="node-g")
    try:
        assert _restore(other.stub, "restore-1", 2) == 1
        assert engine.adapter_digest("runs/a") == saved_digest
        assert listed(other.stub) == {"runs/a": (2, 0)}
        # Fresh (no checkpoint) replaces the copy with a new adapter at step 0.
        assert _restore(other.stub, "", 3) == 0
        assert engine.adapter_digest("runs/a") != saved_digest
    finally:
        other.close()
        core.close()


def test_a_restore_that_cannot_load_leaves_no_adapter(node, engine):  # noqa: F811
    stub = node.stub
    create(stub, "runs/a", 1)
    _save(stub, "rank-4", 0, 0)
    bigger = type(LORA)(rank=LORA.rank * 2, train_attn=True, train_mlp=True, train_unembed=True, seed=1)
    code, reason = status_of(lambda: _restore(stub, "rank-4", 2, adapter_id="runs/c", lora=bigger))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LORA_CONFIG_MISMATCH")
    code, _ = status_of(lambda: _restore(stub, "missing", 2, adapter_id="runs/d"))
    assert code is grpc.StatusCode.NOT_FOUND
    assert "runs/c" not in engine.adapter_ids() and "runs/d" not in engine.adapter_ids()
    assert set(listed(stub)) == {"runs/a"}
    # Over a copy the node holds: the copy is gone with the failed restore, from the
    # engine and from the ledger (nothing lists an adapter that is not there).
    code, reason = status_of(lambda: _restore(stub, "rank-4", 2, adapter_id="runs/a", lora=bigger))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LORA_CONFIG_MISMATCH")
    assert "runs/a" not in engine.adapter_ids() and listed(stub) == {}


# ---- unfenced calls ---------------------------------------------------------------------


def test_unfenced_calls_apply_every_time(node, engine):  # noqa: F811
    stub = node.stub
    create(stub, "runs/a", 0)
    create(stub, "runs/twin", 0)
    first = run_batch(stub, fb("fb-1", "runs/a"), optim("opt-1", "runs/a"))
    again = run_batch(stub, fb("fb-1", "runs/a"), optim("opt-1", "runs/a"))
    assert [r.item_id for r in again] == ["fb-1", "opt-1"]
    assert again[1].optim_step.metrics["step:max"] == 2
    assert not np.array_equal(logprobs_of(again[0])[0], logprobs_of(first[0])[0])
    run_batch(stub, fb("fb-t", "runs/twin"), optim("opt-t", "runs/twin"))
    assert engine.adapter_digest("runs/a") != engine.adapter_digest("runs/twin")
    assert listed(stub) == {"runs/a": (0, 0), "runs/twin": (0, 0)}


def test_epoch_zero_passes_a_raised_epoch(node):
    stub = node.stub
    create(stub, "runs/a", 1)
    adopt(stub, "runs/a", 5)
    (fwd,) = run_batch(stub, fb("fwd", "runs/a", kind=FWD))
    assert fwd.WhichOneof("outcome") == "result"
    (fenced_seq,) = run_batch(stub, fb("seq-only", "runs/a", 1, 0))  # a seq_id without an epoch
    assert fenced_seq.WhichOneof("outcome") == "result"
    assert listed(stub) == {"runs/a": (5, 1)}
    saved = _save(stub, "unfenced", 0, 0)
    assert saved.step == 0
