"""The real SDK against an in-process gRPC server with a fake, in-memory tunemesh.v1 servicer.

The fake records every call (metadata, request_id, seq_id), executes operations strictly in
seq_id order after a short delay, rejects the first two submits of chosen request ids with
UNAVAILABLE, and reports errors as a rich status with a reason like the real scheduler. It
can answer INTERNAL to a submit (before or after queueing it) and lose its queued operations
as a restarted scheduler does.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

import tunemesh
from tunemesh.errors import error_for, to_status
from tunemesh.v1 import (
    operations_pb2,
    operations_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
    types_pb2,
)

API_KEY = "tm-test-key"
MODEL = "tiny-dense"
FAST_RETRY = tunemesh.RetryPolicy(
    initial_backoff_s=0.01, max_backoff_s=0.05, total_timeout_s=5.0, attempt_timeout_s=5.0
)


class FakeMesh:
    """Shared in-memory state of the three fake services."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.metadata: list[tuple[str, str | None]] = []
        self.heartbeats = 0
        self.ended: list[str] = []
        self.attempts: list[tuple[str, int, str]] = []  # (method, seq_id, request_id)
        self.flaky_request_ids: collections.Counter[str] = collections.Counter()
        self.fail_first_submits = 0
        self.by_request_id: dict[str, str] = {}
        self.ops: dict[str, operations_pb2.Operation] = {}
        self.queued: dict[int, tuple[str, object]] = {}
        self.executed: list[int] = []
        self.next_seq = 1
        self.step = 0
        self.waits: collections.Counter[str] = collections.Counter()
        self.op_delay_s = 0.02
        self.internal_next_submits = 0
        self.internal_after_queueing = False
        self.op_numbers = itertools.count(1)
        threading.Thread(target=self._execute_loop, daemon=True).start()

    def check_auth(self, context: grpc.ServicerContext, method: str) -> None:
        auth = dict(context.invocation_metadata()).get("authorization")
        with self.cond:
            self.metadata.append((method, auth))
        if auth != f"Bearer {API_KEY}":
            abort(context, grpc.StatusCode.UNAUTHENTICATED, "BAD_API_KEY", "unknown API key")

    def submit(self, method: str, request, context) -> operations_pb2.Operation:
        with self.cond:
            self.attempts.append((method, request.seq_id, request.request_id))
            if self.fail_first_submits and self.flaky_request_ids[request.request_id] < 2:
                self.flaky_request_ids[request.request_id] += 1
                abort(context, grpc.StatusCode.UNAVAILABLE, "NODE_DOWN", "try again")
            if self.internal_next_submits and not self.internal_after_queueing:
                self.internal_next_submits -= 1
                abort(context, grpc.StatusCode.INTERNAL, "", "internal error")
            if request.request_id in self.by_request_id:
                return self.ops[self.by_request_id[request.request_id]]
            if getattr(request, "loss_fn", "cross_entropy") == "bogus":
                # Like the scheduler: a rejected submit leaves no trace, its seq_id is free.
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_LOSS_FN", "bogus?")
            name = f"operations/{next(self.op_numbers)}"
            op = operations_pb2.Operation(
                name=name, state=operations_pb2.OPERATION_STATE_QUEUED,
                run=request.run, seq_id=request.seq_id,
            )
            self.ops[name] = op
            self.by_request_id[request.request_id] = name
            self.queued[request.seq_id] = (method, request)
            self.cond.notify_all()
            if self.internal_next_submits:
                self.internal_next_submits -= 1
                abort(context, grpc.StatusCode.INTERNAL, "", "internal error")
            return op

    def lose_queued(self) -> list[int]:
        """Forget every operation not yet running, as a restarted scheduler does; their seq_ids."""
        with self.cond:
            lost = sorted(self.queued)
            for seq in lost:
                _, request = self.queued.pop(seq)
                del self.ops[self.by_request_id.pop(request.request_id)]
            return lost

    def _execute_loop(self) -> None:
        while True:
            with self.cond:
                while self.next_seq not in self.queued:
                    self.cond.wait()
                seq = self.next_seq
                method, request = self.queued.pop(seq)
            time.sleep(self.op_delay_s)
            with self.cond:
                self._complete(seq, method, request)
                self.next_seq += 1
                self.cond.notify_all()

    def _complete(self, seq: int, method: str, request) -> None:
        self.executed.append(seq)
        op = self.ops[self.by_request_id[request.request_id]]
        op.done = True
        op.state = operations_pb2.OPERATION_STATE_SUCCEEDED
        if method == "OptimStep":
            self.step += 1
            op.optim_step.metrics["step:max"] = self.step
            op.optim_step.metrics["learning_rate:mean"] = request.adam_params.learning_rate
        elif request.loss_fn == "nan_loss":
            op.state = operations_pb2.OPERATION_STATE_FAILED
            op.error.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            op.error.reason = "NON_FINITE_LOSS"
            op.error.message = "loss is nan"
        else:
            op.forward_backward.CopyFrom(fake_forward_result(request, self.step))

    def wait(self, name: str, timeout_s: float) -> operations_pb2.Operation | None:
        """The operation once done or at the timeout; None if it is unknown (lost)."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            self.waits[name] += 1
            op = self.ops.get(name)
            if op is None:
                return None
            while not op.done and (left := deadline - time.monotonic()) > 0:
                self.cond.wait(left)
            return operations_pb2.Operation.FromString(op.SerializeToString())


def fake_forward_result(request, step: int) -> types_pb2.ForwardBackwardResult:
    """logprobs = -(target token id) / 10 in float32, shaped like target_tokens."""
    result = types_pb2.ForwardBackwardResult()
    total = 0.0
    for datum in request.data:
        tt = datum.loss_fn_inputs["target_tokens"]
        targets = np.frombuffer(tt.data, "<i8").reshape(tuple(tt.shape))
        weights = np.frombuffer(datum.loss_fn_inputs["weights"].data, "<f4")
        logprobs = (-targets / 10.0).astype("<f4")
        total += float(-(logprobs.reshape(-1) * weights).sum())
        out = result.outputs.add()
        out.loss_fn_outputs["logprobs"].CopyFrom(
            types_pb2.TensorData(
                dtype=types_pb2.DTYPE_FLOAT32, shape=list(tt.shape), data=logprobs.tobytes()
            )
        )
    result.metrics["loss:sum"] = total
    result.metrics["step:max"] = step
    return result


def abort(context, code: grpc.StatusCode, reason: str, message: str) -> None:
    context.abort_with_status(to_status(error_for(code, reason, message)))


class FakeSessions(sessions_pb2_grpc.SessionServiceServicer):
    def __init__(self, mesh: FakeMesh, tokenizer_json: bytes) -> None:
        self.mesh, self.tokenizer_json = mesh, tokenizer_json

    def CreateSession(self, request, context):
        self.mesh.check_auth(context, "CreateSession")
        return sessions_pb2.CreateSessionResponse(session=sessions_pb2.Session(name="sessions/s1"))

    def HeartbeatSession(self, request, context):
        self.mesh.check_auth(context, "HeartbeatSession")
        self.mesh.heartbeats += 1
        return sessions_pb2.HeartbeatSessionResponse()

    def EndSession(self, request, context):
        self.mesh.check_auth(context, "EndSession")
        self.mesh.ended.append(request.session)
        return sessions_pb2.EndSessionResponse()

    def GetCapabilities(self, request, context):
        self.mesh.check_auth(context, "GetCapabilities")
        model = sessions_pb2.SupportedModel(
            name=MODEL, family="dense", vocab_size=1024, max_seq_len=512, max_lora_rank=64
        )
        limits = sessions_pb2.RequestLimits(max_datums=64, max_tokens=8192)
        return sessions_pb2.GetCapabilitiesResponse(models=[model], limits=limits)

    def GetTokenizer(self, request, context):
        self.mesh.check_auth(context, "GetTokenizer")
        if request.base_model != MODEL:
            abort(context, grpc.StatusCode.NOT_FOUND, "UNKNOWN_MODEL", request.base_model)
        files = [sessions_pb2.TokenizerFile(name="tokenizer.json", content=self.tokenizer_json)]
        return sessions_pb2.GetTokenizerResponse(files=files)


class FakeTraining(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, mesh: FakeMesh) -> None:
        self.mesh = mesh
        self.runs: dict[str, training_pb2.TrainingRun] = {}

    def CreateTrainingRun(self, request, context):
        self.mesh.check_auth(context, "CreateTrainingRun")
        run = training_pb2.TrainingRun(
            name="runs/r1", session=request.session, base_model=request.base_model,
            lora_config=request.lora_config,
        )
        self.runs[run.name] = run
        return training_pb2.CreateTrainingRunResponse(run=run)

    def GetTrainingRun(self, request, context):
        self.mesh.check_auth(context, "GetTrainingRun")
        if request.name not in self.runs:
            abort(context, grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND", request.name)
        run = training_pb2.TrainingRun()
        run.CopyFrom(self.runs[request.name])
        run.step = self.mesh.step
        return training_pb2.GetTrainingRunResponse(run=run)

    def Forward(self, request, context):
        self.mesh.check_auth(context, "Forward")
        return training_pb2.ForwardResponse(operation=self.mesh.submit("Forward", request, context))

    def ForwardBackward(self, request, context):
        self.mesh.check_auth(context, "ForwardBackward")
        op = self.mesh.submit("ForwardBackward", request, context)
        return training_pb2.ForwardBackwardResponse(operation=op)

    def OptimStep(self, request, context):
        self.mesh.check_auth(context, "OptimStep")
        op = self.mesh.submit("OptimStep", request, context)
        return training_pb2.OptimStepResponse(operation=op)


class FakeOperations(operations_pb2_grpc.OperationServiceServicer):
    def __init__(self, mesh: FakeMesh) -> None:
        self.mesh = mesh

    def WaitOperation(self, request, context):
        self.mesh.check_auth(context, "WaitOperation")
        timeout_s = request.timeout.ToNanoseconds() / 1e9 or 30.0
        operation = self.mesh.wait(request.name, min(timeout_s, 30.0))
        if operation is None:
            abort(context, grpc.StatusCode.NOT_FOUND, "OPERATION_NOT_FOUND", request.name)
        return operations_pb2.WaitOperationResponse(operation=operation)


def make_tokenizer_json() -> bytes:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str().encode()


@pytest.fixture()
def mesh():
    saved = {k: os.environ.get(k) for k in ("no_proxy", "NO_PROXY")}
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    fake = FakeMesh()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16), options=[("grpc.so_reuseport", 0)]
    )
    sessions_pb2_grpc.add_SessionServiceServicer_to_server(
        FakeSessions(fake, make_tokenizer_json()), server
    )
    training_pb2_grpc.add_TrainingServiceServicer_to_server(FakeTraining(fake), server)
    operations_pb2_grpc.add_OperationServiceServicer_to_server(FakeOperations(fake), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    fake.address = f"127.0.0.1:{port}"
    yield fake
    server.stop(grace=None)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture()
def service(mesh, tmp_path):
    client = tunemesh.ServiceClient(
        mesh.address, API_KEY, retry_policy=FAST_RETRY, heartbeat_interval_s=0.05,
        tokenizer_cache_dir=tmp_path, wait_timeout_s=0.2,
    )
    yield client
    client.close()


def datum(tokens: list[int]) -> tunemesh.Datum:
    return tunemesh.Datum(
        tunemesh.ModelInput.from_ints(tokens[:-1]),
        {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def test_pipelined_calls_execute_in_seq_order_and_resolve(mesh, service):
    trainer = service.create_lora_training_client(MODEL, rank=8, seed=3)
    fb1 = trainer.forward_backward([datum([1, 5, 7]), datum([2, 3])])
    step1 = trainer.optim_step(tunemesh.AdamParams(learning_rate=1e-3))
    fb2 = trainer.forward_backward([datum([4, 6])])
    assert not fb2.done()  # calls return before their operations finish

    out1, out2 = fb1.result(timeout=10), fb2.result(timeout=10)
    assert mesh.executed == [1, 2, 3]
    assert out1.metrics["step:max"] == 0 and out2.metrics["step:max"] == 1
    assert step1.result(timeout=10).metrics == {"step:max": 1, "learning_rate:mean": 1e-3}
    logprobs = out1.loss_fn_outputs[0]["logprobs"]
    assert logprobs.dtype == "float32" and logprobs.shape == [2]
    np.testing.assert_allclose(logprobs.to_numpy(), [-0.5, -0.7], rtol=1e-6)
    assert out1.metrics["loss:sum"] == pytest.approx(0.5 + 0.7 + 0.3)
    assert [a[1] for a in mesh.attempts] == [1, 2, 3]


def test_submit_retries_reuse_request_id_and_seq_id(mesh, service):
    mesh.fail_first_submits = 2
    trainer = service.create_lora_training_client(MODEL)
    result = trainer.forward_backward([datum([1, 2, 3])]).result(timeout=10)
    assert result.metrics["loss:sum"] == pytest.approx(0.5)
    assert len(mesh.attempts) == 3
    assert len({(seq, rid) for _, seq, rid in mesh.attempts}) == 1
    assert mesh.executed == [1]


def test_every_call_carries_the_api_key_and_session_lifecycle(mesh, service):
    trainer = service.create_lora_training_client(MODEL)
    trainer.forward([datum([1, 2])]).result(timeout=10)
    deadline = time.monotonic() + 5
    while mesh.heartbeats < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mesh.heartbeats >= 2
    service.close()
    methods = {m for m, _ in mesh.metadata}
    assert {"CreateSession", "CreateTrainingRun", "Forward", "WaitOperation"} <= methods
    assert "EndSession" in methods and mesh.ended == ["sessions/s1"]
    assert {auth for _, auth in mesh.metadata} == {f"Bearer {API_KEY}"}


def test_wrong_key_maps_to_unauthenticated_with_reason(mesh):
    with tunemesh.ServiceClient(mesh.address, "wrong", retry_policy=FAST_RETRY) as client:
        with pytest.raises(tunemesh.UnauthenticatedError) as info:
            client.get_server_capabilities()
    assert info.value.reason == "BAD_API_KEY" and info.value.message == "unknown API key"


def test_await_inside_asyncio_run(mesh, service):
    trainer = service.create_lora_training_client(MODEL)

    async def train_step():
        fb = trainer.forward_backward([datum([3, 4])])
        step = trainer.optim_step(tunemesh.AdamParams())
        return await asyncio.gather(fb, step)

    fb_out, step_out = asyncio.run(train_step())
    assert fb_out.metrics["loss:sum"] == pytest.approx(0.4)
    assert step_out.metrics["step:max"] == 1

    async def tinker_style_double_await():
        fb = await trainer.forward_backward_async([datum([3, 4])], "cross_entropy")
        step = await trainer.optim_step_async(tunemesh.AdamParams())
        return await fb, await step

    fb_out, step_out = asyncio.run(tinker_style_double_await())
    assert fb_out.metrics["step:max"] == 1 and step_out.metrics["step:max"] == 2


def test_errors_map_to_typed_errors_and_do_not_break_later_calls(mesh, service):
    trainer = service.create_lora_training_client(MODEL)
    rejected = trainer.forward_backward([datum([1, 2])], loss_fn="bogus")
    failed = trainer.forward_backward([datum([1, 2])], loss_fn="nan_loss")
    fine = trainer.forward_backward([datum([1, 2])])
    with pytest.raises(tunemesh.InvalidArgumentError) as rejected_info:
        rejected.result(timeout=10)
    assert rejected_info.value.reason == "UNKNOWN_LOSS_FN"
    with pytest.raises(tunemesh.InvalidArgumentError) as failed_info:
        failed.result(timeout=10)
    assert failed_info.value.reason == "NON_FINITE_LOSS"
    assert failed_info.value.message == "loss is nan"
    assert fine.result(timeout=10).metrics["loss:sum"] == pytest.approx(0.2)
    assert [seq for _, seq, _ in mesh.attempts] == [1, 1, 2]  # the rejected seq_id is reused
    assert mesh.executed == [1, 2]


@pytest.mark.parametrize("after_queueing", [False, True])
def test_internal_on_submit_is_resent_before_the_next_call_so_no_gap_forms(mesh, service, after_queueing):
    mesh.internal_next_submits, mesh.internal_after_queueing = 1, after_queueing
    trainer = service.create_lora_training_client(MODEL)
    with pytest.raises(tunemesh.InternalError):
        trainer.forward_backward([datum([1, 2])]).result(timeout=10)
    assert trainer.forward_backward([datum([1, 3])]).result(timeout=10).metrics["loss:sum"] == pytest.approx(0.3)
    assert [seq for _, seq, _ in mesh.attempts] == [1, 1, 2]
    assert mesh.attempts[0] == mesh.attempts[1]  # the same request_id: queued (and run) once
    assert mesh.executed == [1, 2] and len(mesh.ops) == 2


def test_request_grpc_refuses_for_its_size_fails_at_once_and_frees_its_seq_id(mesh):
    small = grpc.insecure_channel(mesh.address, options=[("grpc.max_send_message_length", 4096)])
    with tunemesh.ServiceClient(mesh.address, API_KEY, retry_policy=FAST_RETRY, channel=small,
                                wait_timeout_s=0.2) as client:
        trainer = client.create_lora_training_client(MODEL)
        with pytest.raises(tunemesh.InvalidArgumentError) as info:
            trainer.forward_backward([datum(list(range(1000)))]).result(timeout=10)
        assert info.value.reason == "REQUEST_TOO_LARGE" and "4096 bytes" in info.value.message
        assert trainer.forward_backward([datum([1, 2])]).result(timeout=10).metrics["loss:sum"] == pytest.approx(0.2)
    assert [seq for _, seq, _ in mesh.attempts] == [1]  # the large one never left the client
    assert mesh.executed == [1]


def test_operations_lost_by_a_scheduler_restart_are_resent_and_run_once(mesh, service):
    mesh.op_delay_s = 0.3  # seq_id 1 runs while 2 and 3 wait in the queue
    trainer = service.create_lora_training_client(MODEL)
    futures = [trainer.forward_backward([datum([1, 2])]), trainer.optim_step(tunemesh.AdamParams()),
               trainer.forward_backward([datum([1, 4])])]
    deadline = time.monotonic() + 5
    while len(mesh.attempts) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    lost = mesh.lose_queued()
    assert lost
    assert futures[2].result(timeout=10).metrics == {"loss:sum": pytest.approx(0.4), "step:max": 1}
    assert futures[1].result(timeout=10).metrics["step:max"] == 1
    assert futures[0].result(timeout=10).metrics["step:max"] == 0
    assert mesh.executed == [1, 2, 3]
    resent = collections.Counter(mesh.attempts)
    assert sorted(seq for (_, seq, _), n in resent.items() if n == 2) == lost  # same request_id


def test_long_poll_loops_until_done(mesh, service):
    mesh.op_delay_s = 0.5  # longer than the client's 0.2 s wait timeout
    trainer = service.create_lora_training_client(MODEL)
    trainer.forward([datum([1, 2])]).result(timeout=10)
    assert max(mesh.waits.values()) >= 2


def test_capabilities_info_and_tokenizer(mesh, service, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "transformers", None)  # the light fallback: 10 s faster
    caps = service.get_server_capabilities()
    assert [m.model_name for m in caps.supported_models] == [MODEL]
    assert caps.supported_models[0].max_lora_rank == 64 and caps.max_datums == 64
    trainer = service.create_lora_training_client(MODEL, rank=16, alpha=32.0, train_mlp=False)
    info = trainer.get_info()
    assert info.model_data.model_name == MODEL and info.model_id == trainer.model_id
    assert info.lora_rank == 16 and info.lora_config.alpha == 32.0
    assert not info.lora_config.train_mlp and info.lora_config.train_attn
    tokenizer = trainer.get_tokenizer()
    assert tokenizer is trainer.get_tokenizer()
    assert tokenizer.encode("hello world").ids == [1, 2]
    with pytest.raises(tunemesh.NotFoundError):
        service.get_tokenizer("other-model")
