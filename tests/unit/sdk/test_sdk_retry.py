"""Retry policy and error mapping."""

from __future__ import annotations

import grpc
import pytest
from sdk_fakes import FakeChannel, FakeRpcError

import tunemesh
from tunemesh.errors import error_for, error_from_rpc
from tunemesh.retry import RetryPolicy, call_with_retry
from tunemesh.transport import Transport
from tunemesh.v1 import sessions_pb2


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(codes: list[grpc.StatusCode], result="ok"):
    """An attempt function that raises the given codes in turn, then returns `result`."""
    timeouts: list[float] = []

    def attempt(timeout: float):
        timeouts.append(timeout)
        if len(timeouts) <= len(codes):
            raise FakeRpcError(codes[len(timeouts) - 1], "boom", reason="WHY")
        return result

    attempt.timeouts = timeouts
    return attempt


POLICY = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=4.0, total_timeout_s=30.0,
                     attempt_timeout_s=10.0)


@pytest.mark.parametrize("code", sorted(tunemesh.retry.RETRYABLE_CODES, key=str))
def test_retryable_codes_are_retried_until_success(code):
    clock = FakeClock()
    attempt = failing([code, code])
    assert call_with_retry(attempt, POLICY, sleep=clock.sleep, clock=clock) == "ok"
    assert len(attempt.timeouts) == 3
    assert 0.5 <= clock.sleeps[0] <= 1.0 and 1.0 <= clock.sleeps[1] <= 2.0
    assert all(t <= POLICY.attempt_timeout_s for t in attempt.timeouts)


@pytest.mark.parametrize(
    ("code", "error_cls"),
    [(grpc.StatusCode.INVALID_ARGUMENT, tunemesh.InvalidArgumentError),
     (grpc.StatusCode.NOT_FOUND, tunemesh.NotFoundError),
     (grpc.StatusCode.INTERNAL, tunemesh.InternalError),
     (grpc.StatusCode.UNAUTHENTICATED, tunemesh.UnauthenticatedError),
     (grpc.StatusCode.FAILED_PRECONDITION, tunemesh.FailedPreconditionError)],
)
def test_other_codes_fail_at_once_with_typed_error(code, error_cls):
    clock = FakeClock()
    attempt = failing([code])
    with pytest.raises(error_cls) as info:
        call_with_retry(attempt, POLICY, sleep=clock.sleep, clock=clock)
    assert len(attempt.timeouts) == 1 and clock.sleeps == []
    assert (info.value.code, info.value.reason, info.value.message) == (code, "WHY", "boom")


def test_total_deadline_bounds_retries():
    clock = FakeClock()
    attempt = failing([grpc.StatusCode.UNAVAILABLE] * 100)
    with pytest.raises(tunemesh.UnavailableError):
        call_with_retry(attempt, POLICY, sleep=clock.sleep, clock=clock)
    assert clock.now - 100.0 <= POLICY.total_timeout_s
    assert 5 <= len(attempt.timeouts) <= 30
    assert max(clock.sleeps) <= POLICY.max_backoff_s
    # attempts never outlive the deadline
    assert attempt.timeouts[-1] <= POLICY.total_timeout_s - sum(clock.sleeps) + 1e-9


def test_backoff_grows_with_jitter_and_caps():
    assert POLICY.backoff(0, rand=lambda: 0.0) == 0.5
    assert POLICY.backoff(0, rand=lambda: 1.0) == 1.0
    assert POLICY.backoff(2, rand=lambda: 0.5) == 3.0
    assert POLICY.backoff(10, rand=lambda: 1.0) == 4.0


def test_error_mapping_reads_reason_and_unknown_codes():
    err = error_from_rpc(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", "QUOTA"))
    assert isinstance(err, tunemesh.ResourceExhaustedError) and err.reason == "QUOTA"
    assert "QUOTA" in str(err) and "full" in str(err)
    assert isinstance(error_for(5, "RUN_NOT_FOUND"), tunemesh.NotFoundError)
    assert error_for(99).code == grpc.StatusCode.UNKNOWN
    no_trailers = error_from_rpc(FakeRpcError(grpc.StatusCode.ABORTED, "race"))
    assert isinstance(no_trailers, tunemesh.AbortedError) and no_trailers.reason == ""


@pytest.mark.parametrize(
    ("details", "too_large"),
    [("CLIENT: Sent message larger than max (9000 vs. 4096)", True),  # this channel refused it
     ("SERVER: Received message larger than max (9000 vs. 4096)", True),  # the server did
     ("CLIENT: Received message larger than max (9000 vs. 4096)", False),  # a big response
     ("quota", False)],
)
def test_grpc_size_refusals_of_a_request_are_final_request_too_large(details, too_large):
    def attempt(timeout: float):
        raise FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, details)

    clock = FakeClock()
    with pytest.raises(tunemesh.TunemeshError) as info:
        call_with_retry(attempt, POLICY, sleep=clock.sleep, clock=clock)
    err = info.value
    if not too_large:
        assert isinstance(err, tunemesh.ResourceExhaustedError) and err.reason == ""
        assert clock.sleeps  # retried as capacity
        return
    assert isinstance(err, tunemesh.InvalidArgumentError) and err.reason == "REQUEST_TOO_LARGE"
    assert "9000 bytes" in err.message and "4096 bytes" in err.message and details in err.message
    assert clock.sleeps == []  # not retried: it would fail the same way


def test_transport_refuses_a_request_over_its_limit_before_sending():
    channel = FakeChannel({"CreateSession": lambda r, m: sessions_pb2.CreateSessionResponse()})
    transport = Transport(channel, "k", POLICY, max_request_bytes=100)
    transport.call(transport.sessions.CreateSession, sessions_pb2.CreateSessionRequest(labels={"a": "b"}))
    big = sessions_pb2.CreateSessionRequest(labels={"a": "b" * 100})
    with pytest.raises(tunemesh.InvalidArgumentError) as info:
        transport.call(transport.sessions.CreateSession, big, what="CreateSession")
    assert info.value.reason == "REQUEST_TOO_LARGE"
    assert info.value.message.startswith(f"CreateSession is {big.ByteSize()} bytes, over the limit of 100 bytes")
    assert len(channel.calls) == 1


def test_transport_sends_bearer_key_and_retries_the_identical_request():
    failures = []

    def capabilities(request, metadata):
        if len(failures) < 2:
            failures.append(1)
            raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)
        return sessions_pb2.GetCapabilitiesResponse()

    channel = FakeChannel({"GetCapabilities": capabilities})
    policy = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.002)
    transport = Transport(channel, "secret", policy)
    transport.call(transport.sessions.GetCapabilities, sessions_pb2.GetCapabilitiesRequest())
    assert len(channel.calls) == 3
    assert {meta["authorization"] for _, _, meta, _ in channel.calls} == {"Bearer secret"}
    anonymous = Transport(channel, None, policy)
    anonymous.call(anonymous.sessions.GetCapabilities, sessions_pb2.GetCapabilitiesRequest())
    assert "authorization" not in channel.calls[-1][2]


@pytest.mark.parametrize(("reason", "retried"), [("SAMPLE_ROWS_QUOTA", True), ("TENANT_RUN_QUOTA", False),
                                                  ("STORAGE_QUOTA", False), ("DISK_FULL", False)])
def test_quotas_only_the_caller_can_free_are_not_retried(reason, retried):
    attempts = []

    def attempt(timeout: float):
        attempts.append(timeout)
        if len(attempts) == 1:
            raise FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "over quota", reason)
        return "ok"

    clock = FakeClock()
    if retried:
        assert call_with_retry(attempt, POLICY, sleep=clock.sleep, clock=clock) == "ok"
        assert len(clock.sleeps) == 1
    else:
        with pytest.raises(tunemesh.ResourceExhaustedError) as info:
            call_with_retry(attempt, POLICY, sleep=clock.sleep, clock=clock)
        assert info.value.reason == reason and clock.sleeps == []
