"""SamplingClient: generate from a base model or one immutable checkpoint."""

from __future__ import annotations

from typing import Any

from tunemesh.futures import APIFuture
from tunemesh.transport import Transport
from tunemesh.types import ModelInput, SampledSequence, SampleResponse, SamplingParams
from tunemesh.v1 import sampling_pb2

_STOP_REASONS = {sampling_pb2.STOP_REASON_LENGTH: "length", sampling_pb2.STOP_REASON_STOP: "stop"}
# One attempt may take this long: a batch of long generations on a busy sampler takes
# minutes, and giving up early only makes the retry queue behind the abandoned work.
SAMPLE_ATTEMPT_TIMEOUT_S = 900.0


class SamplingClient:
    """Samples from what it was created for, always: a checkpoint's weights never change,
    so a client made after `save_weights_for_sampler` sees those weights and no others.
    Calls return futures at once; many can be in flight (the service batches them), each
    a coroutine on the client's event loop."""

    def __init__(self, transport: Transport, name: str, base_model: str, model_path: str) -> None:
        self._transport = transport
        self.sampling_session, self.base_model, self.model_path = name, base_model, model_path

    def sample(self, prompt: ModelInput, num_samples: int = 1, sampling_params: SamplingParams | None = None,
               include_prompt_logprobs: bool = False) -> APIFuture[SampleResponse]:
        """`num_samples` continuations of `prompt`, with tokens, logprobs and stop reasons;
        with `include_prompt_logprobs` also the prompt's logprobs (as `compute_logprobs`
        returns them, in the same call)."""
        request = sampling_pb2.SampleRequest(
            sampling_session=self.sampling_session, prompt=_wire_prompt(prompt), num_samples=num_samples,
            sampling_params=params_to_proto(sampling_params or SamplingParams()),
            prompt_logprobs=include_prompt_logprobs,
        )
        return self._submit(self._transport.sampling.Sample, request,
                            lambda response: _sample_response(response, include_prompt_logprobs))

    def compute_logprobs(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        """logprob of each prompt token given the ones before it; the first is None."""
        request = sampling_pb2.ComputeLogprobsRequest(sampling_session=self.sampling_session,
                                                      prompt=_wire_prompt(prompt))
        return self._submit(self._transport.sampling.ComputeLogprobs, request,
                            lambda response: [None, *response.logprobs])

    async def sample_async(self, *args: Any, **kwargs: Any) -> SampleResponse:
        return await self.sample(*args, **kwargs)

    async def compute_logprobs_async(self, prompt: ModelInput) -> list[float | None]:
        return await self.compute_logprobs(prompt)

    def _submit(self, method: Any, request: Any, convert: Any) -> APIFuture[Any]:
        what = type(request).__name__

        async def call() -> Any:  # deterministic for a seed, so retrying is safe
            return convert(await self._transport.call_async(method, request, what=what,
                                                            attempt_timeout_s=SAMPLE_ATTEMPT_TIMEOUT_S))

        return APIFuture(self._transport.loop.submit(call()))

    def __repr__(self) -> str:
        return f"SamplingClient({self.sampling_session!r}, model_path={self.model_path!r})"


def params_to_proto(params: SamplingParams) -> sampling_pb2.SamplingParams:
    stop = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
    msg = sampling_pb2.SamplingParams(
        max_tokens=params.max_tokens or 0, temperature=params.temperature, top_p=params.top_p,
        top_k=max(params.top_k, 0), stop=[s for s in stop if isinstance(s, str)],
        stop_token_ids=[int(s) for s in stop if not isinstance(s, str)],
        include_stop_str=params.include_stop_str,
    )
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def _wire_prompt(prompt: ModelInput):
    from tunemesh import _wire

    return _wire.model_input_to_proto(prompt)


def _sample_response(response: sampling_pb2.SampleResponse, with_prompt_logprobs: bool) -> SampleResponse:
    return SampleResponse(
        [SampledSequence(list(s.tokens), list(s.logprobs), _STOP_REASONS.get(s.stop_reason, "stop"), s.sequence_id)
         for s in response.sequences],
        [None, *response.prompt_logprobs] if with_prompt_logprobs else None,
    )
