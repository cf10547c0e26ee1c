"""Proto <-> domain conversion for the sampler (the only module that knows both)."""

from __future__ import annotations

from tunemesh_internal.v1 import sampler_pb2
from tunemesh.v1 import sampling_pb2, sessions_pb2
from tunemesh_sampler.adapters import AdapterRef
from tunemesh_sampler.domain import ModelInfo, SampledSequence, SamplingSpec, StopReason

_STOP_REASONS = {StopReason.LENGTH: sampling_pb2.STOP_REASON_LENGTH, StopReason.STOP: sampling_pb2.STOP_REASON_STOP}


def adapter_ref(msg: sampler_pb2.AdapterRef) -> AdapterRef | None:
    return AdapterRef(msg.tenant, msg.path) if msg.path else None


def spec(params: sampling_pb2.SamplingParams) -> SamplingSpec:
    return SamplingSpec(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p or 1.0,
        top_k=params.top_k,
        stop=tuple(params.stop),
        stop_token_ids=tuple(params.stop_token_ids),
        seed=params.seed if params.HasField("seed") else None,
        include_stop_str=params.include_stop_str,
    )


def sequence(seq: SampledSequence) -> sampling_pb2.SampledSequence:
    return sampling_pb2.SampledSequence(
        tokens=list(seq.tokens), logprobs=list(seq.logprobs), stop_reason=_STOP_REASONS[seq.stop_reason]
    )


def supported_model(info: ModelInfo) -> sessions_pb2.SupportedModel:
    return sessions_pb2.SupportedModel(
        name=info.name, family=info.family, vocab_size=info.vocab_size, max_seq_len=info.max_seq_len,
        max_lora_rank=info.max_lora_rank,
    )
