"""A sampler refuses Sample / ComputeLogprobs of a deposed scheduler (a lower leader
token than it has seen), before any work; and the scheduler's port sends its token."""

from __future__ import annotations

import asyncio

import pytest

from tunemesh_internal.v1 import sampler_pb2
from tunemesh.errors import FailedPreconditionError, UnavailableError
from tunemesh_common.service.rpc import LEADER_TOKEN_KEY
from tunemesh_sampler.server import SamplerServicer
from tunemesh_scheduler.sampler_client import GrpcSamplerPort


class _Context:
    def __init__(self, token: int | None) -> None:
        self._metadata = () if token is None else ((LEADER_TOKEN_KEY, str(token)),)

    def invocation_metadata(self):
        return self._metadata


@pytest.mark.parametrize("method, request_", [
    ("Sample", sampler_pb2.SampleRequest(prompt_tokens=[1, 2], num_samples=1)),
    ("ComputeLogprobs", sampler_pb2.ComputeLogprobsRequest(prompt_tokens=[1, 2])),
])
def test_a_call_of_a_deposed_leader_is_refused_before_any_work(method, request_):
    servicer = SamplerServicer("sampler-0", "127.0.0.1:1", 4)  # no engine: a call that passes answers LOADING
    call = getattr(servicer, method)
    with pytest.raises(UnavailableError):
        asyncio.run(call(request_, _Context(7)))
    with pytest.raises(FailedPreconditionError) as refused:
        asyncio.run(call(request_, _Context(6)))
    assert refused.value.reason == "STALE_LEADER"
    for token in (7, 8, None):  # the leader itself, a newer one, an unfenced caller (tests, tools)
        with pytest.raises(UnavailableError):
            asyncio.run(call(request_, _Context(token)))
    with pytest.raises(FailedPreconditionError):
        asyncio.run(call(request_, _Context(7)))  # 8 took over


def test_the_schedulers_sampler_port_sends_its_leader_token():
    seen = []

    class _Stub:
        async def Sample(self, request, timeout, metadata):
            seen.append(dict(metadata))
            return sampler_pb2.SampleResponse()

    port = GrpcSamplerPort(lambda node: "127.0.0.1:1", 5.0)
    port._channels.stub = lambda node: _Stub()
    port.leader_token = 42
    asyncio.run(port.sample("sampler-0", sampler_pb2.SampleRequest()))
    assert seen == [{LEADER_TOKEN_KEY: "42"}]
