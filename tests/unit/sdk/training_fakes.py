"""Training and operation handlers for a FakeChannel, shared by the TrainingClient tests."""

from __future__ import annotations

import threading
import time

import grpc
from sdk_fakes import FakeRpcError

import tunemesh
from tunemesh.v1 import operations_pb2, sessions_pb2, training_pb2, types_pb2

FAST = tunemesh.RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.005, total_timeout_s=5)

DATA = [tunemesh.Datum(tunemesh.ModelInput.from_ints([1, 2]),
                       {"target_tokens": [2, 3], "weights": [1, 1]})]

SUBMITS = ("Forward", "ForwardBackward", "OptimStep")


def submitted(channel) -> list:
    """Every submit the channel carried, retries and re-sends included, in wire order."""
    return [req for name, req, _, _ in channel.calls if name in SUBMITS]


class FakeMesh:
    """Handlers for a FakeChannel: operations finish at the first WaitOperation.

    Like the scheduler, a submit whose request_id it holds returns that operation, and a
    seq_id it has passed (`passed`) without holding its call answers SEQ_ID_PASSED.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[str, object] = {}  # operation name -> submit request
        self.flaky: dict[str, int] = {}  # request_id -> failures left
        self.fail_next_submits = 0
        self.hang = False
        self.done_at_submit = False
        self.reject: dict[str, grpc.StatusCode] = {}  # loss_fn -> submit error
        self.answers: list[grpc.StatusCode] = []  # errors for the next submits, before queueing
        self.passed: set[int] = set()  # seq_ids the run is past
        self.lose_next_waits = 0  # WaitOperations that find their operation lost (a restart)
        self.pass_lost = False  # whether the run is past a lost operation's seq_id
        self.lost: set[str] = set()  # operations lost so far
        self.lose_each_once = False  # a re-sent operation is not lost again
        self.max_request_bytes = 0  # > 0: refuse larger submits like grpc's client does
        self.handlers = {
            "CreateSession": lambda r, m: sessions_pb2.CreateSessionResponse(
                session=sessions_pb2.Session(name="sessions/s1")),
            "EndSession": lambda r, m: sessions_pb2.EndSessionResponse(),
            "HeartbeatSession": lambda r, m: sessions_pb2.HeartbeatSessionResponse(),
            "CreateTrainingRun": self.create_run,
            "ForwardBackward": self.submit(training_pb2.ForwardBackwardResponse),
            "Forward": self.submit(training_pb2.ForwardResponse),
            "OptimStep": self.submit(training_pb2.OptimStepResponse),
            "SaveWeightsForSampler": self.submit(training_pb2.SaveWeightsForSamplerResponse),
            "WaitOperation": self.wait,
        }

    def create_run(self, request, metadata):
        self.maybe_fail(request.request_id)
        run = training_pb2.TrainingRun(name="runs/r1", base_model=request.base_model)
        return training_pb2.CreateTrainingRunResponse(run=run)

    def maybe_fail(self, request_id: str) -> None:
        with self.lock:
            if self.fail_next_submits and request_id not in self.flaky:
                self.flaky[request_id] = self.fail_next_submits
            if self.flaky.get(request_id, 0) > 0:
                self.flaky[request_id] -= 1
                raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down")
            if self.answers:
                raise FakeRpcError(self.answers.pop(0), "the service failed")

    def submit(self, response_cls):
        def handle(request, metadata):
            size = request.ByteSize()
            if 0 < self.max_request_bytes < size:
                raise FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"CLIENT: Sent message larger than max ({size} vs. {self.max_request_bytes})")
            self.maybe_fail(request.request_id)
            if getattr(request, "loss_fn", "") in self.reject:
                raise FakeRpcError(self.reject[request.loss_fn], "no", reason="REJECTED")
            name = f"operations/{request.request_id}"
            with self.lock:
                if name not in self.requests and request.seq_id in self.passed:
                    raise FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "passed", reason="SEQ_ID_PASSED")
                self.requests[name] = request
            op = operations_pb2.Operation(name=name, seq_id=request.seq_id)
            if self.done_at_submit:
                self.finish(op, request)
            return response_cls(operation=op)

        return handle

    def wait(self, request, metadata):
        with self.lock:
            lose = not (self.lose_each_once and request.name in self.lost)
            if self.lose_next_waits and request.name in self.requests and lose:
                self.lose_next_waits -= 1
                self.lost.add(request.name)
                lost = self.requests.pop(request.name)
                if self.pass_lost:
                    self.passed.add(lost.seq_id)
                raise FakeRpcError(grpc.StatusCode.NOT_FOUND, "gone", reason="OPERATION_NOT_FOUND")
            submitted = self.requests[request.name]
        op = operations_pb2.Operation(name=request.name, seq_id=submitted.seq_id)
        if self.hang:
            time.sleep(0.01)
        else:
            self.finish(op, submitted)
        return operations_pb2.WaitOperationResponse(operation=op)

    @staticmethod
    def finish(op, request) -> None:
        op.done = True
        if isinstance(request, training_pb2.OptimStepRequest):
            op.optim_step.metrics["seq:max"] = request.seq_id
        elif isinstance(request, training_pb2.SaveWeightsForSamplerRequest):
            name = request.name or f"auto-{request.seq_id:06d}"
            op.save_checkpoint.checkpoint.path = f"tunemesh://{request.run}/sampler/{name}"
        elif request.loss_fn == "nan":
            op.error.code, op.error.reason, op.error.message = 3, "NON_FINITE_LOSS", "nan"
        else:
            op.forward_backward.metrics["seq:max"] = request.seq_id
            for datum in request.data:  # logprobs 0, shaped like the targets
                targets = datum.loss_fn_inputs["target_tokens"]
                logprobs = types_pb2.TensorData(dtype=types_pb2.DTYPE_FLOAT32, shape=targets.shape,
                                                data=bytes(4 * len(targets.data) // 8))
                op.forward_backward.outputs.add().loss_fn_outputs["logprobs"].CopyFrom(logprobs)
