"""TrainingClient submits whose outcome is unknown, refused or lost: no seq_id is ever
skipped or wedged, and each call executes at most once."""

from __future__ import annotations

import re

import grpc
import pytest
from sdk_fakes import FakeChannel
from training_fakes import DATA, FAST, FakeMesh, submitted

import tunemesh
from tunemesh.operations import MAX_RESENDS, OperationTracker
from tunemesh.training_client import TrainingClient
from tunemesh.transport import Transport

QUICK = tunemesh.RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.002, total_timeout_s=0.1)

# ~8 KB on the wire: over the 4 KB limits these tests set, while DATA is far under them.
BIG = [tunemesh.Datum(tunemesh.ModelInput.from_ints(list(range(1000))),
                      {"target_tokens": list(range(1, 1001)), "weights": [1.0] * 1000})]


@pytest.fixture()
def mesh():
    return FakeMesh()


@pytest.fixture()
def channel(mesh):
    return FakeChannel(mesh.handlers)


@pytest.fixture()
def trainer(channel):
    with tunemesh.ServiceClient("fake:1", "k", retry_policy=FAST, channel=channel) as service:
        yield service.create_lora_training_client("m")


def ids(requests) -> list[tuple[str, int, str]]:
    return [(type(r).__name__, r.seq_id, r.request_id) for r in requests]


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN])
def test_an_unclear_answer_keeps_the_submit_in_doubt_and_the_next_call_resends_it_first(
    trainer, channel, mesh, code
):
    mesh.answers = [code]
    failed = trainer.forward_backward(DATA)
    with pytest.raises(tunemesh.TunemeshError) as info:
        failed.result(timeout=5)
    assert info.value.code is code
    step, fb = trainer.optim_step(), trainer.forward_backward(DATA)
    assert [step.result(timeout=5).metrics["seq:max"], fb.result(timeout=5).metrics["seq:max"]] == [2, 3]
    sent = ids(submitted(channel))
    assert sent[0] == sent[1]  # re-sent unchanged: same request_id, same seq_id
    assert [s[:2] for s in sent] == [("ForwardBackwardRequest", 1), ("ForwardBackwardRequest", 1),
                                     ("OptimStepRequest", 2), ("ForwardBackwardRequest", 3)]
    assert f"operations/{sent[0][2]}" in mesh.requests  # the service now holds seq_id 1


def test_a_settled_in_doubt_submit_is_not_sent_again(trainer, channel, mesh):
    mesh.answers = [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE]
    with pytest.raises(tunemesh.InternalError):
        trainer.forward_backward(DATA).result(timeout=5)
    # The re-send before optim_step meets UNAVAILABLE, retried: it settles on the retry.
    assert trainer.optim_step().result(timeout=5).metrics["seq:max"] == 2
    assert [trainer.forward(DATA).result(timeout=5).metrics["seq:max"] for _ in range(2)] == [3, 4]
    assert [r.seq_id for r in submitted(channel)] == [1, 1, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("loss_fn", "passed", "next_seq_id"),
    [("bad", set(), 1),  # rejected: the service never queued it, its seq_id is free
     ("cross_entropy", {1}, 2)],  # SEQ_ID_PASSED: the run is past it, the next call must be too
)
def test_a_definitive_answer_to_the_resend_settles_the_doubt(channel, mesh, loss_fn, passed, next_seq_id):
    mesh.reject = {"bad": grpc.StatusCode.INVALID_ARGUMENT}
    with tunemesh.ServiceClient("fake:1", "k", retry_policy=QUICK, channel=channel) as service:
        trainer = service.create_lora_training_client("m")
        mesh.fail_next_submits = 10**6
        with pytest.raises(tunemesh.UnavailableError):
            trainer.forward_backward(DATA, loss_fn).result(timeout=5)
        mesh.fail_next_submits, mesh.passed = 0, passed
        mesh.flaky.clear()
        assert trainer.optim_step().result(timeout=5).metrics["seq:max"] == next_seq_id
        assert trainer.optim_step().result(timeout=5).metrics["seq:max"] == next_seq_id + 1
    sent = submitted(channel)
    assert [type(r).__name__ for r in sent[-3:]] == ["ForwardBackwardRequest", "OptimStepRequest",
                                                     "OptimStepRequest"]  # re-sent once only


def test_a_request_over_the_size_limit_fails_at_once_and_frees_its_seq_id(channel, mesh):
    transport = Transport(channel, "k", FAST, max_request_bytes=4096)
    tracker = OperationTracker(transport)
    trainer = TrainingClient(transport, tracker, "runs/r1", "m")
    try:
        with pytest.raises(tunemesh.InvalidArgumentError) as info:
            trainer.forward_backward(BIG).result(timeout=5)
        assert info.value.reason == "REQUEST_TOO_LARGE"
        size = re.search(r"is (\d+) bytes, over the limit of 4096 bytes", info.value.message)
        assert size and int(size[1]) > 4096
        assert submitted(channel) == []  # refused before sending
        assert trainer.forward(DATA).result(timeout=5).metrics["seq:max"] == 1
        assert trainer.optim_step().result(timeout=5).metrics["seq:max"] == 2
        assert [r.seq_id for r in submitted(channel)] == [1, 2]  # nothing re-sent
    finally:
        tracker.close()
        trainer._close()


def test_grpc_refusing_a_request_for_its_size_is_final_and_frees_its_seq_id(trainer, channel, mesh):
    """The channel's own limit, lower than the SDK knows: grpc raises RESOURCE_EXHAUSTED."""
    mesh.max_request_bytes = 4096
    with pytest.raises(tunemesh.InvalidArgumentError) as info:
        trainer.forward_backward(BIG).result(timeout=5)
    assert info.value.reason == "REQUEST_TOO_LARGE" and "4096" in info.value.message
    assert trainer.forward(DATA).result(timeout=5).metrics["seq:max"] == 1
    assert trainer.optim_step().result(timeout=5).metrics["seq:max"] == 2
    assert [r.seq_id for r in submitted(channel)] == [1, 1, 2]  # one attempt, no retry or re-send


def test_a_lost_operation_is_resent_with_the_same_ids_and_its_future_resolves(trainer, channel, mesh):
    mesh.lose_next_waits = 1
    assert trainer.forward_backward(DATA).result(timeout=5).metrics["seq:max"] == 1
    assert trainer.optim_step().result(timeout=5).metrics["seq:max"] == 2
    sent = ids(submitted(channel))
    assert sent[0] == sent[1] and [s[1] for s in sent] == [1, 1, 2]


def test_every_submit_asks_to_be_acknowledged_once_queued_its_resend_too(trainer, channel, mesh):
    """The client keeps each call until its result and re-sends a lost one, so the service
    need not store a call before acknowledging it (tunemesh_scheduler/core/journal.py)."""
    mesh.lose_next_waits = 1
    trainer.forward_backward(DATA).result(timeout=5)
    trainer.forward(DATA).result(timeout=5)
    trainer.optim_step().result(timeout=5)
    sent = submitted(channel)
    assert [r.seq_id for r in sent] == [1, 1, 2, 3] and all(r.ack_when_queued for r in sent)


def test_a_lost_operation_whose_resend_is_rejected_fails_with_that_error(trainer, channel, mesh):
    mesh.lose_next_waits, mesh.pass_lost = 1, True
    with pytest.raises(tunemesh.FailedPreconditionError) as info:
        trainer.forward_backward(DATA).result(timeout=5)
    assert info.value.reason == "SEQ_ID_PASSED"
    assert trainer.optim_step().result(timeout=5).metrics["seq:max"] == 2
    assert [r.seq_id for r in submitted(channel)] == [1, 1, 2]


def test_forward_backward_custom_resends_its_lost_probe_and_its_lost_surrogate(trainer, channel, mesh):
    torch = pytest.importorskip("torch")
    mesh.lose_next_waits, mesh.lose_each_once = 2, True  # the probe's first wait, then the surrogate's

    def loss_fn(data, logprobs):
        return -logprobs[0].sum() + torch.tensor(1.5), {}

    out = trainer.forward_backward_custom(DATA, loss_fn).result(timeout=5)
    assert out.metrics["loss:sum"] == 1.5 and out.metrics["seq:max"] == 2
    sent = ids(submitted(channel))
    assert [s[:2] for s in sent] == [("ForwardRequest", 1), ("ForwardRequest", 1),
                                     ("ForwardBackwardRequest", 2), ("ForwardBackwardRequest", 2)]
    assert sent[0] == sent[1] and sent[2] == sent[3]


def test_resends_of_a_lost_operation_are_bounded(trainer, channel, mesh):
    mesh.lose_next_waits = 100
    with pytest.raises(tunemesh.NotFoundError) as info:
        trainer.forward_backward(DATA).result(timeout=5)
    assert info.value.reason == "OPERATION_NOT_FOUND"
    assert len(submitted(channel)) == 1 + MAX_RESENDS

