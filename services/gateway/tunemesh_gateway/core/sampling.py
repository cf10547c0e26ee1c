"""Sampling sessions and samples.

A sampling session is made once per client counter (`session_id`,
`sampling_session_seq_id`), whether by `create_sampling_session` or by an unnamed
save_weights_for_sampler. A sample runs in the background (Sample is a blocking call):
`asample` answers at once with its request id and the sequence ids it mints; the
request id is the SDK's own idempotency key (sampling session, seq_id), so a re-sent
submit finds the running sample.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

from tinker import types as tt
from tinker.proto import tinker_public_pb2 as tpb

from tunemesh.errors import InvalidArgumentError, NotFoundError
from tunemesh.v1 import sampling_pb2

from tunemesh_gateway import convert
from tunemesh_gateway.core.futures import SAMPLE, FutureRef, LocalFutures
from tunemesh_gateway.core.names import Names
from tunemesh_gateway.core.ports import Caller, GatewayStore, SamplerEntry, Upstream
from tunemesh_gateway.status import HttpError

@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    call_timeout_s: float = 30.0
    sample_timeout_s: float = 900.0
    max_samples_per_call: int = 16
    max_inflight_samples: int = 512


class SamplingCore:
    def __init__(self, upstream: Upstream, store: GatewayStore, names: Names, futures: LocalFutures,
                 config: SamplingConfig) -> None:
        self._up, self._store, self._names, self._futures, self._config = upstream, store, names, futures, config
        self._opening: dict[tuple[str, int], tuple[asyncio.Lock, int]] = {}  # (lock, its holder and waiters)

    # -- sampling sessions -------------------------------------------------------------

    async def create_sampling_session(self, caller: Caller, request: tt.CreateSamplingSessionRequest) -> dict[str, Any]:
        model_path = await self._names.tunemesh_path(caller, request.model_path) if request.model_path else ""
        entry = await self.open(caller, request.session_id, request.sampling_session_seq_id,
                                "" if model_path else (request.base_model or ""), model_path, request.model_path or "")
        return {"type": "create_sampling_session", "sampling_session_id": entry.sampler_id}

    async def open(self, caller: Caller, session_id: str, seq_id: int, base_model: str, model_path: str,
                   tinker_path: str) -> SamplerEntry:
        """The sampling session of client counter (`session_id`, `seq_id`), made on first use."""
        key = (session_id, seq_id)
        lock, users = self._opening.get(key, (asyncio.Lock(), 0))
        self._opening[key] = (lock, users + 1)  # forgotten by its last user, not by the first done
        try:
            async with lock:
                existing = await self._store.sampler_for_seq(session_id, seq_id)
                if existing is not None and existing.owner == caller.owner:
                    return existing
                call = sampling_pb2.CreateSamplingSessionRequest(
                    session=convert.session_name(session_id), base_model=base_model, model_path=model_path)
                made = (await self._up.call(caller, self._up.sampling.CreateSamplingSession, call,
                                            self._config.call_timeout_s)).sampling_session
                entry = SamplerEntry(convert.sampler_id_of(made.name), made.base_model, tinker_path, caller.owner)
                return await self._store.put_sampler(entry, session_id, seq_id)
        finally:
            lock, users = self._opening[key]
            if users == 1:
                del self._opening[key]
            else:
                self._opening[key] = (lock, users - 1)

    async def get_sampler(self, caller: Caller, sampler_id: str) -> dict[str, Any]:
        entry = await self._store.sampler(sampler_id)
        if entry is None or entry.owner != caller.owner:
            raise NotFoundError("SAMPLING_SESSION_NOT_FOUND", f"sampler {sampler_id[:140]!r} not found")
        return {"sampler_id": entry.sampler_id, "base_model": entry.base_model, "model_path": entry.model_path or None}

    # -- samples -----------------------------------------------------------------------

    async def asample(self, caller: Caller, request: tt.SampleRequest) -> dict[str, Any]:
        """Start the sample (once per (sampling session, seq_id)); its sequence ids at once."""
        convert.check_sample_request(request)
        if request.num_samples < 1:
            raise InvalidArgumentError("BAD_NUM_SAMPLES", f"num_samples must be >= 1, got {request.num_samples}")
        sampler = request.sampling_session_id
        # The SDK numbers its samples (seq_id), which makes a re-sent one find its future; a
        # call without one (raw HTTP) is its own sample, never another's.
        seq = request.seq_id if request.seq_id is not None else f"u{uuid.uuid4().hex}"
        request_id = FutureRef(SAMPLE, f"{caller.owner}/{sampler}/{seq}").encode()
        prompt = convert.prompt(request.prompt)
        if (not self._futures.has(request_id, caller.owner)
                and self._futures.running(SAMPLE) >= self._config.max_inflight_samples):
            raise HttpError(429, "too many samples in flight at the gateway; retry shortly")
        self._futures.start(request_id, caller.owner, SAMPLE, lambda: self._sample(caller, request, prompt))
        return {"request_id": request_id,
                "sample_sequence_ids": [f"{sampler}:{seq}:{i}" for i in range(request.num_samples)]}

    async def _sample(self, caller: Caller, request: tt.SampleRequest, prompt: Any) -> tpb.SampleResponse:
        """Sample calls of at most max_samples_per_call sequences (the first also asks for
        the prompt's logprobs); ComputeLogprobs when the scheduler did not return them."""
        session = convert.sampler_name(request.sampling_session_id)
        prompt_len = sum(len(c.encoded_text.tokens) for c in prompt.chunks)
        params = convert.sampling_params(request.sampling_params, request.sampling_params.max_tokens or 0)
        sizes = _split(request.num_samples, self._config.max_samples_per_call)
        calls = []
        for i, size in enumerate(sizes):
            call = sampling_pb2.SampleRequest(sampling_session=session, prompt=prompt, num_samples=size,
                                              sampling_params=params)
            if i and params.HasField("seed"):  # the same seed in every call would repeat its samples
                call.sampling_params.seed = params.seed + i
            call.prompt_logprobs = i == 0 and bool(request.prompt_logprobs)
            calls.append(self._up.call(caller, self._up.sampling.Sample, call, self._config.sample_timeout_s))
        responses = await asyncio.gather(*calls)
        logprobs = None
        if request.prompt_logprobs:
            logprobs = list(getattr(responses[0], "prompt_logprobs", ()))
            if len(logprobs) != max(prompt_len - 1, 0):  # a scheduler that predates SampleRequest.prompt_logprobs
                scored = await self._up.call(
                    caller, self._up.sampling.ComputeLogprobs,
                    sampling_pb2.ComputeLogprobsRequest(sampling_session=session, prompt=prompt),
                    self._config.sample_timeout_s)
                logprobs = list(scored.logprobs)
        sequences = [seq for response in responses for seq in response.sequences]
        return convert.sample_response(sequences, logprobs, prompt_len, request.prompt_logprobs_last_n)


def _split(total: int, most: int) -> list[int]:
    return [min(most, total - start) for start in range(0, total, most)]

