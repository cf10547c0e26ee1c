"""The whole mesh end to end: etcd, a trainer and the scheduler as real processes on
loopback, driven through the SDK and, where request_id / seq_id must be controlled, the
raw public stubs."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import tunemesh
from tunemesh_internal.v1 import trainer_pb2
from tunemesh.v1 import (
    operations_pb2, operations_pb2_grpc, sessions_pb2, sessions_pb2_grpc, training_pb2, training_pb2_grpc,
    types_pb2,
)
from tunemesh_local.state import MeshState
from mesh_tls import etcdctl, scheduler_channel

pytestmark = pytest.mark.e2e

MODEL = "tunemesh/tiny-dense"
VOCAB = 1024
ALICE, BOB = "tml-demo-alice", "tml-demo-bob"
MAX_DATUMS = 8
GAP_TIMEOUT_S = 8  # short, so a gap fails fast instead of hanging the suite
RESULT_TIMEOUT_S = 60
KEYS_CHECK_S = 2.0  # the scheduler's default api_keys_check_s
ADAM = tunemesh.AdamParams(learning_rate=1e-2)
ADAM_PB = types_pb2.AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-12)
SCHEDULER_ENV = {
    "TUNEMESH_SCHEDULER_MAX_DATUMS": str(MAX_DATUMS),
    "TUNEMESH_SCHEDULER_GAP_TIMEOUT_S": str(GAP_TIMEOUT_S),
    "TUNEMESH_SCHEDULER_BATCH_WAIT_MS": "20",  # lets two tenants' ready work share a batch
}


@pytest.fixture(scope="module")
def mesh(start_mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshState]:
    state_dir = tmp_path_factory.mktemp("mesh")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("no_proxy", "127.0.0.1,localhost")  # this process's gRPC clients too
        patch.setenv("NO_PROXY", "127.0.0.1,localhost")
        with start_mesh(state_dir, trainers=1, models=(MODEL,), env=SCHEDULER_ENV) as running:
            yield running


@pytest.fixture
def alice(mesh: MeshState) -> Iterator[tunemesh.ServiceClient]:
    with tunemesh.ServiceClient(mesh.scheduler_address, api_key=ALICE) as client:
        yield client


class Stubs:
    """The raw public stubs with one API key (or none)."""

    def __init__(self, channel: grpc.Channel, key: str | None) -> None:
        self.metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self.sessions = sessions_pb2_grpc.SessionServiceStub(channel)
        self.training = training_pb2_grpc.TrainingServiceStub(channel)
        self.operations = operations_pb2_grpc.OperationServiceStub(channel)

    def call(self, method, request, timeout: float = 30.0):
        return method(request, metadata=self.metadata, timeout=timeout)

    def new_run(self, seed: int = 5) -> str:
        session = self.call(self.sessions.CreateSession, sessions_pb2.CreateSessionRequest()).session.name
        lora = types_pb2.LoraConfig(rank=8, seed=seed, train_attn=True, train_mlp=True)
        request = training_pb2.CreateTrainingRunRequest(session=session, base_model=MODEL, lora_config=lora,
                                                        request_id=str(uuid.uuid4()))
        return self.call(self.training.CreateTrainingRun, request).run.name

    def forward_backward(self, run: str, seq_id: int, request_id: str, data) -> operations_pb2.Operation:
        request = training_pb2.ForwardBackwardRequest(run=run, seq_id=seq_id, request_id=request_id, data=data,
                                                      loss_fn="cross_entropy")
        return self.call(self.training.ForwardBackward, request).operation

    def optim_step(self, run: str, seq_id: int, request_id: str, adam=ADAM_PB) -> operations_pb2.Operation:
        request = training_pb2.OptimStepRequest(run=run, seq_id=seq_id, request_id=request_id, adam_params=adam)
        return self.call(self.training.OptimStep, request).operation

    def wait(self, name: str, timeout_s: float = RESULT_TIMEOUT_S) -> operations_pb2.Operation:
        """Long-poll until done (or `timeout_s`, in calls of at most the server's cap)."""
        deadline = time.monotonic() + timeout_s
        while True:
            op = self.wait_once(name, min(25.0, max(0.0, deadline - time.monotonic())))
            if op.done or time.monotonic() >= deadline:
                return op

    def wait_once(self, name: str, timeout_s: float) -> operations_pb2.Operation:
        timeout = duration_pb2.Duration()
        timeout.FromNanoseconds(int(timeout_s * 1e9))
        request = operations_pb2.WaitOperationRequest(name=name, timeout=timeout)
        return self.call(self.operations.WaitOperation, request, timeout=timeout_s + 10).operation

    def run(self, name: str) -> training_pb2.TrainingRun:
        return self.call(self.training.GetTrainingRun, training_pb2.GetTrainingRunRequest(name=name)).run


@pytest.fixture(scope="module")
def channel(mesh: MeshState) -> Iterator[grpc.Channel]:
    with scheduler_channel(mesh) as ch:
        yield ch


@pytest.fixture
def stubs(channel: grpc.Channel) -> Stubs:
    return Stubs(channel, ALICE)


def rpc_failure(call) -> tuple[grpc.StatusCode, str]:
    """(status code, reason) of a call that must fail, the reason read from the standard rich
    status (`google.rpc.Status` in `grpc-status-details-bin`, its tunemesh `ErrorInfo`)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    status = rpc_status.from_call(info.value)
    for detail in status.details if status is not None else ():
        error_info = error_details_pb2.ErrorInfo()
        if detail.Unpack(error_info) and error_info.domain == "tunemesh":
            return info.value.code(), error_info.reason
    return info.value.code(), ""


def sdk_failure(call) -> tunemesh.TunemeshError:
    """The typed SDK error of `call()` (a future's `.result()` or a direct call)."""
    with pytest.raises(tunemesh.TunemeshError) as info:
        call()
    return info.value


# ---- data ------------------------------------------------------------------------------


def make_data(seed: int, count: int = 3) -> list[tunemesh.Datum]:
    """`count` next-token datums of different lengths, token ids in [1, VOCAB)."""
    rng = np.random.default_rng(seed)
    data = []
    for index in range(count):
        tokens = rng.integers(1, VOCAB, size=12 + 3 * index + 1)
        weights = np.ones(len(tokens) - 1, dtype=np.float32)
        data.append(tunemesh.Datum(
            model_input=tunemesh.ModelInput.from_ints(tokens[:-1].tolist()),
            loss_fn_inputs={"target_tokens": tokens[1:].astype(np.int64), "weights": weights},
        ))
    return data


def proto_datum(tokens, targets, weights=None) -> types_pb2.Datum:
    targets = np.asarray(targets, dtype="<i8")
    inputs = {"target_tokens": types_pb2.TensorData(dtype=types_pb2.DTYPE_INT64, shape=[len(targets)],
                                                    data=targets.tobytes())}
    if weights is not None:
        weights = np.asarray(weights, dtype="<f4")
        inputs["weights"] = types_pb2.TensorData(dtype=types_pb2.DTYPE_FLOAT32, shape=[len(weights)],
                                                 data=weights.tobytes())
    chunk = types_pb2.ModelInputChunk(encoded_text=types_pb2.EncodedTextChunk(tokens=list(tokens)))
    return types_pb2.Datum(model_input=types_pb2.ModelInput(chunks=[chunk]), loss_fn_inputs=inputs)


def proto_data(seed: int = 0, count: int = 2, length: int = 10) -> list[types_pb2.Datum]:
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(count):
        tokens = rng.integers(1, VOCAB, size=length + 1)
        data.append(proto_datum(tokens[:-1].tolist(), tokens[1:]))
    return data


def train_pipelined(client: tunemesh.TrainingClient, data, steps: int) -> list[tuple]:
    """Submit fb, optim, fb, optim, ... without waiting; then resolve all in order."""
    futures = [(client.forward_backward(data), client.optim_step(ADAM)) for _ in range(steps)]
    return [(fb.result(RESULT_TIMEOUT_S), step.result(RESULT_TIMEOUT_S)) for fb, step in futures]


def logprobs(output) -> list[np.ndarray]:
    return [np.asarray(out["logprobs"].to_numpy(), dtype=np.float64) for out in output.loss_fn_outputs]


# ---- 1. two tenants, pipelined, fused: same numbers as alone ------------------------------


STEPS = 5
TENANTS = {ALICE: (11, make_data(101)), BOB: (22, make_data(202))}


def _train_fresh(address: str, key: str, results: dict, barrier: threading.Barrier | None = None) -> None:
    seed, data = TENANTS[key]
    with tunemesh.ServiceClient(address, api_key=key) as service:
        client = service.create_lora_training_client(MODEL, rank=8, seed=seed)
        if barrier is not None:
            barrier.wait(timeout=30)
        results[key] = train_pipelined(client, data, STEPS)


def test_two_tenants_pipelined_concurrently_match_training_alone(mesh: MeshState) -> None:
    together: dict = {}
    barrier = threading.Barrier(len(TENANTS))
    threads = [threading.Thread(target=_train_fresh, args=(mesh.scheduler_address, key, together, barrier))
               for key in TENANTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert set(together) == set(TENANTS), "a tenant's training thread failed (see captured output)"
    for key in TENANTS:
        alone: dict = {}
        _train_fresh(mesh.scheduler_address, key, alone)
        losses = [fb.metrics["loss:sum"] for fb, _ in together[key]]
        assert all(np.isfinite(losses)) and losses[-1] < 0.95 * losses[0], (key, losses)
        assert [step.metrics["step:max"] for _, step in together[key]] == list(range(1, STEPS + 1))
        for (fb, step), (fb_ref, step_ref) in zip(together[key], alone[key], strict=True):
            assert fb.metrics["loss:sum"] == pytest.approx(fb_ref.metrics["loss:sum"], rel=1e-5, abs=1e-5)
            assert step.metrics["grad_norm:max"] == pytest.approx(step_ref.metrics["grad_norm:max"], rel=1e-5)
            for got, want in zip(logprobs(fb), logprobs(fb_ref), strict=True):
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # the tenants' data and seeds differ: equal numbers would mean their adapters were mixed up
    assert together[ALICE][0][0].metrics["loss:sum"] != pytest.approx(together[BOB][0][0].metrics["loss:sum"])


# ---- 2. placement in etcd and `tunemesh status` -----------------------------------------


def etcdctl_get_prefix(mesh: MeshState, prefix: str) -> dict[str, bytes]:
    """Keys under `prefix` read by the etcdctl binary (independent of the registry code),
    as etcd's root user over TLS (the mesh's admin certificate)."""
    out = subprocess.run([*etcdctl(mesh), "-w", "json", "get", "--prefix", prefix],
                         check=True, capture_output=True, text=True, timeout=20,
                         env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin", "no_proxy": "127.0.0.1,localhost"})
    kvs = json.loads(out.stdout).get("kvs", [])
    return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")) for kv in kvs}


@pytest.mark.skipif(shutil.which("etcdctl") is None, reason="etcdctl not installed (Debian: etcd-client)")
def test_placement_and_trainer_record_are_in_etcd_and_status(mesh: MeshState, channel: grpc.Channel,
                                                              stubs: Stubs) -> None:
    runs = [stubs.new_run(), Stubs(channel, BOB).new_run()]
    trainer = mesh.by_role("trainer")[0]
    placements = etcdctl_get_prefix(mesh, "/tunemesh/placement/")
    for run in runs:
        key = "/tunemesh/placement/runs/" + run.removeprefix("runs/")
        assert placements[key].decode() == trainer.name, (run, placements)
    assert stubs.run(runs[0]).trainer_node == trainer.name

    deadline = time.monotonic() + 10  # the trainer refreshes its record every second
    while True:
        record = etcdctl_get_prefix(mesh, "/tunemesh/nodes/trainers/")
        node = trainer_pb2.TrainerNode.FromString(record[f"/tunemesh/nodes/trainers/{trainer.name}"])
        if node.adapters >= len(runs) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (node.node_id, node.address) == (trainer.name, trainer.address)
    assert [m.name for m in node.models] == [MODEL] and node.models[0].vocab_size == VOCAB
    assert node.adapters >= len(runs)

    out = subprocess.run([sys.executable, "-m", "tunemesh_local.cli", "status", "--json",
                          "--state-dir", mesh.state_dir], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["etcd"]["reachable"] and all(p["alive"] for p in status["processes"])
    assert {p["role"] for p in status["processes"]} == {"etcd", "checkpoint", "trainer", "scheduler"}
    assert [t["node_id"] for t in status["trainers"]] == [trainer.name]
    for run in runs:
        assert status["placements"][run.removeprefix("runs/")] == trainer.name


# ---- 3. authentication and tenant isolation ---------------------------------------------


def test_missing_or_bad_api_key_is_unauthenticated(mesh: MeshState, channel: grpc.Channel) -> None:
    request = sessions_pb2.CreateSessionRequest()
    for key in (None, "tml-not-a-key"):
        raw = Stubs(channel, key)
        code, _ = rpc_failure(lambda: raw.call(raw.sessions.CreateSession, request))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        caps = sessions_pb2.GetCapabilitiesRequest()
        code, _ = rpc_failure(lambda: raw.call(raw.sessions.GetCapabilities, caps))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    with tunemesh.ServiceClient(mesh.scheduler_address, api_key="tml-not-a-key") as bad:
        assert isinstance(sdk_failure(bad.get_server_capabilities), tunemesh.UnauthenticatedError)


def test_the_meshs_fresh_keys_work_and_keys_made_or_revoked_apply_without_a_restart(mesh: MeshState) -> None:
    from tunemesh_local import launcher

    keys = launcher.client_keys(mesh)  # made by `tunemesh up` for this mesh, hashed for the schedulers
    assert sorted(keys) == ["alice", "bob"] and keys["alice"] not in (ALICE, BOB)
    with tunemesh.ServiceClient(mesh.scheduler_address, api_key=keys["bob"]) as bob:
        bob.get_server_capabilities()

    def keys_cli(*argv: str) -> str:
        argv = [sys.executable, "-m", "tunemesh_local.cli", "keys", *argv, "--state-dir", mesh.state_dir]
        return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout

    carol = keys_cli("create", "--tenant", "carol").strip()
    time.sleep(KEYS_CHECK_S + 0.5)  # the schedulers look at the keys file at most every KEYS_CHECK_S
    with tunemesh.ServiceClient(mesh.scheduler_address, api_key=carol) as client:
        client.get_server_capabilities()
        keys_cli("revoke", carol.split("-")[1])
        time.sleep(KEYS_CHECK_S + 0.5)
        assert isinstance(sdk_failure(client.get_server_capabilities), tunemesh.UnauthenticatedError)


def test_other_tenant_sees_not_found(channel: grpc.Channel, stubs: Stubs) -> None:
    run = stubs.new_run()
    op = stubs.forward_backward(run, 1, str(uuid.uuid4()), proto_data())
    bob = Stubs(channel, BOB)
    fb = training_pb2.ForwardBackwardRequest(run=run, seq_id=2, request_id=str(uuid.uuid4()),
                                             data=proto_data(), loss_fn="cross_entropy")
    optim = training_pb2.OptimStepRequest(run=run, seq_id=2, request_id=str(uuid.uuid4()), adam_params=ADAM_PB)
    calls = [
        (bob.training.GetTrainingRun, training_pb2.GetTrainingRunRequest(name=run)),
        (bob.training.ForwardBackward, fb),
        (bob.training.OptimStep, optim),
        (bob.operations.GetOperation, operations_pb2.GetOperationRequest(name=op.name)),
        (bob.operations.WaitOperation, operations_pb2.WaitOperationRequest(name=op.name)),
        (bob.operations.CancelOperation, operations_pb2.CancelOperationRequest(name=op.name)),
    ]
    for method, request in calls:
        code, reason = rpc_failure(lambda: bob.call(method, request))
        assert code == grpc.StatusCode.NOT_FOUND, (method, code)
        assert reason in ("RUN_NOT_FOUND", "OPERATION_NOT_FOUND")
    listed = bob.call(bob.training.ListTrainingRuns, training_pb2.ListTrainingRunsRequest(page_size=1000))
    assert run not in [r.name for r in listed.runs]
    done = stubs.wait(op.name)  # bob's attempts changed nothing for alice
    assert done.state == operations_pb2.OPERATION_STATE_SUCCEEDED
    assert stubs.run(run).last_seq_id == 1


# ---- 4. validation: clear reasons, nothing queued, the run unharmed ------------------------


def _bad_datum(tokens, targets, weights=None) -> tunemesh.Datum:
    inputs = {"target_tokens": np.asarray(targets, dtype=np.int64)}
    if weights is not None:
        inputs["weights"] = np.asarray(weights, dtype=np.float32)
    return tunemesh.Datum(tunemesh.ModelInput.from_ints(tokens), inputs)


def test_invalid_requests_fail_with_reasons_and_leave_the_run_intact(alice: tunemesh.ServiceClient,
                                                                    stubs: Stubs) -> None:
    assert alice.get_server_capabilities().max_datums == MAX_DATUMS
    client = alice.create_lora_training_client(MODEL, rank=8, seed=3)
    data = make_data(7, count=2)
    before = client.forward(data).result(RESULT_TIMEOUT_S)

    good = [1, 2, 3, 4]
    sdk_cases = [
        ("TOKEN_OUT_OF_RANGE", lambda: client.forward_backward([_bad_datum([1, VOCAB, 3], [2, 3, 4])])),
        ("TOKEN_OUT_OF_RANGE", lambda: client.forward_backward([_bad_datum([1, -1, 3], [2, 3, 4])])),
        ("TOKEN_OUT_OF_RANGE", lambda: client.forward_backward([_bad_datum(good, [2, 3, 4, VOCAB + 7])])),
        ("SHAPE_MISMATCH", lambda: client.forward_backward([_bad_datum(good, [2, 3, 4])])),
        ("SHAPE_MISMATCH", lambda: client.forward_backward([_bad_datum(good, [2, 3, 4, 5], [1.0, 1.0])])),
        ("EMPTY_DATA", lambda: client.forward_backward([])),
        ("REQUEST_TOO_LARGE", lambda: client.forward_backward(make_data(8, count=MAX_DATUMS + 1))),
        ("UNKNOWN_LOSS", lambda: client.forward_backward(data, "no_such_loss")),
        ("UNKNOWN_LOSS", lambda: client.forward(data, "no_such_loss")),
    ]
    for reason, submit in sdk_cases:
        error = sdk_failure(lambda: submit().result(RESULT_TIMEOUT_S))
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason), (reason, error)
        assert error.message  # a message for people, naming what was wrong

    error = sdk_failure(lambda: alice.create_lora_training_client("tunemesh/no-such-model", rank=8))
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_MODEL")

    # the same, on the raw wire: status code and the rich status's reason
    run, next_seq = client.run, stubs.run(client.run).last_seq_id + 1
    raw = training_pb2.ForwardBackwardRequest(run=run, seq_id=next_seq, request_id=str(uuid.uuid4()),
                                              data=[proto_datum([1, 5000], [2, 3])], loss_fn="cross_entropy")
    assert rpc_failure(lambda: stubs.call(stubs.training.ForwardBackward, raw)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "TOKEN_OUT_OF_RANGE")
    assert stubs.run(run).last_seq_id == next_seq - 1 and stubs.run(run).step == 0

    after = client.forward(data).result(RESULT_TIMEOUT_S)  # the rejected calls left no gap
    for got, want in zip(logprobs(after), logprobs(before), strict=True):
        np.testing.assert_array_equal(got, want)
    fb, step = train_pipelined(client, data, 1)[0]
    assert np.isfinite(fb.metrics["loss:sum"]) and step.metrics["grad_norm:max"] > 0
    moved = client.forward(data).result(RESULT_TIMEOUT_S)
    assert not np.allclose(logprobs(moved)[0], logprobs(before)[0])  # the step did train
    assert client.get_info().step == 1


# ---- 5. idempotency ------------------------------------------------------------------


def test_same_request_id_executes_once_and_reuse_with_other_payload_fails(stubs: Stubs) -> None:
    run = stubs.new_run()
    data = proto_data(seed=3)
    fb_id, step_id = str(uuid.uuid4()), str(uuid.uuid4())
    first = stubs.forward_backward(run, 1, fb_id, data)
    assert stubs.forward_backward(run, 1, fb_id, data).name == first.name
    step = stubs.optim_step(run, 2, step_id)
    assert stubs.optim_step(run, 2, step_id).name == step.name
    done = stubs.wait(step.name)
    assert done.state == operations_pb2.OPERATION_STATE_SUCCEEDED, done.error
    assert done.optim_step.metrics["step:max"] == 1
    # a retry after completion still answers the finished operation, executes nothing
    again = stubs.optim_step(run, 2, step_id)
    assert (again.name, again.done) == (step.name, True)
    assert again.optim_step.metrics["step:max"] == 1
    assert stubs.run(run).step == 1 and stubs.run(run).last_seq_id == 2

    other_lr = types_pb2.AdamParams(learning_rate=5e-2, beta1=0.9, beta2=0.95, eps=1e-12)
    assert rpc_failure(lambda: stubs.optim_step(run, 2, step_id, adam=other_lr)) == (
        grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert rpc_failure(lambda: stubs.forward_backward(run, 3, fb_id, data)) == (
        grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert stubs.run(run).step == 1 and stubs.run(run).last_seq_id == 2
    # the run carries on with the next seq_id
    next_step = stubs.wait(stubs.optim_step(run, 3, str(uuid.uuid4())).name)
    assert next_step.optim_step.metrics["step:max"] == 2


# ---- 6 + 7. ordering and long-poll ------------------------------------------------------


def test_out_of_order_seq_ids_wait_then_run_in_order(stubs: Stubs) -> None:
    run = stubs.new_run()
    step = stubs.optim_step(run, 2, str(uuid.uuid4()))  # seq 1 has not arrived yet
    started = time.monotonic()
    blocked = stubs.wait_once(step.name, 1.0)
    waited = time.monotonic() - started
    assert not blocked.done and blocked.state == operations_pb2.OPERATION_STATE_QUEUED
    assert 0.9 <= waited < 5.0, waited

    fb = stubs.forward_backward(run, 1, str(uuid.uuid4()), proto_data(seed=4))
    fb_done, step_done = stubs.wait(fb.name), stubs.wait(step.name)
    assert fb_done.state == step_done.state == operations_pb2.OPERATION_STATE_SUCCEEDED
    assert step_done.optim_step.metrics["grad_norm:max"] > 0  # it saw seq 1's gradients
    assert fb_done.end_time.ToNanoseconds() <= step_done.end_time.ToNanoseconds()
    assert stubs.run(run).last_seq_id == 2 and stubs.run(run).step == 1


def test_gap_fails_waiting_ops_after_the_timeout_and_filling_it_resumes_the_run(stubs: Stubs) -> None:
    run = stubs.new_run()
    orphan = stubs.optim_step(run, 2, str(uuid.uuid4()))
    started = time.monotonic()
    failed = stubs.wait(orphan.name, GAP_TIMEOUT_S + 20)
    assert time.monotonic() - started >= GAP_TIMEOUT_S - 1.5
    assert failed.state == operations_pb2.OPERATION_STATE_FAILED
    assert (failed.error.code, failed.error.reason) == (grpc.StatusCode.FAILED_PRECONDITION.value[0], "SEQ_ID_GAP")
    assert "seq_id 1" in failed.error.message
    # the late seq 1 still runs; the failed seq 2 no longer blocks seq 3
    fb = stubs.wait(stubs.forward_backward(run, 1, str(uuid.uuid4()), proto_data(seed=6)).name)
    step = stubs.wait(stubs.optim_step(run, 3, str(uuid.uuid4())).name)
    assert fb.state == step.state == operations_pb2.OPERATION_STATE_SUCCEEDED
    assert step.optim_step.metrics["step:max"] == 1  # the failed optim never ran
    assert stubs.run(run).last_seq_id == 3


def test_wait_operation_returns_as_soon_as_done(stubs: Stubs) -> None:
    run = stubs.new_run()
    op = stubs.forward_backward(run, 1, str(uuid.uuid4()), proto_data(seed=5))
    started = time.monotonic()
    done = stubs.wait_once(op.name, 20.0)
    assert done.done and done.state == operations_pb2.OPERATION_STATE_SUCCEEDED
    assert time.monotonic() - started < 10.0  # far below the 20 s hold
    again = time.monotonic()
    assert stubs.wait_once(op.name, 20.0).done and time.monotonic() - again < 2.0


# ---- 8. pipelining stress ------------------------------------------------------------


def test_thirty_pipelined_calls_all_succeed_in_order(alice: tunemesh.ServiceClient) -> None:
    client = alice.create_lora_training_client(MODEL, rank=8, seed=9)
    data = make_data(303, count=2)
    results = train_pipelined(client, data, 15)
    assert [step.metrics["step:max"] for _, step in results] == list(range(1, 16))
    losses = [fb.metrics["loss:sum"] for fb, _ in results]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    info = client.get_info()
    assert (info.step, info.last_seq_id) == (15, 30)
