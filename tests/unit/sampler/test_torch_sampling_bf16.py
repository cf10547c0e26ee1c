"""The torch sampler over a bfloat16 base (the CPU's AVX512-bf16 option): LoRA stays
float32, and each sampled token's logprob is close to what the float32 engine gives the
same sequence; the adapters still change the output."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tunemesh_sampler.domain import GenerateRequest, SamplingSpec

MAX_LORA_RANK, MAX_SEQ_LEN = 8, 128  # as the suite's conftest

PROMPTS = {"a1": (5, 17, 300, 42, 9), "a2": (11, 12, 13, 14, 15, 16, 17, 18, 19), None: (700, 3, 88)}
# bfloat16 keeps 8 bits of mantissa: logits of ~10 carry errors of ~0.05
BF16_MEAN_ERROR, BF16_MAX_ERROR = 0.1, 0.5


@pytest.fixture(scope="module")
def bf16_engine(model_dir, adapter_dirs):
    from tunemesh_sampler.engine import build_torch_engine

    built = build_torch_engine(model_dir, name="tiny", family="dense", max_lora_rank=MAX_LORA_RANK,
                               max_seq_len=MAX_SEQ_LEN, device="cpu", dtype="bfloat16")
    for key, directory in adapter_dirs.items():
        built.load_adapter(key, directory)
    yield built
    built.close()


def _generate(engine, requests):
    async def gather():
        return await asyncio.gather(*(engine.generate(r) for r in requests))

    return asyncio.run(gather())


def test_bf16_tokens_carry_logprobs_close_to_the_float32_engine(bf16_engine, engine):
    requests = [GenerateRequest(key, prompt, 2, SamplingSpec(max_tokens=8, temperature=1.0, seed=3))
                for key, prompt in PROMPTS.items()]
    errors = []
    for request, sequences in zip(requests, _generate(bf16_engine, requests)):
        for sequence in sequences:
            full = (*request.prompt_tokens, *sequence.tokens)
            want = asyncio.run(engine.prompt_logprobs(request.adapter_key, full))[len(request.prompt_tokens) - 1:]
            errors += np.abs(np.asarray(sequence.logprobs) - np.asarray(want)).tolist()
    assert len(errors) == 48
    assert np.mean(errors) < BF16_MEAN_ERROR and max(errors) < BF16_MAX_ERROR, (np.mean(errors), max(errors))


def test_bf16_adapters_change_the_output(bf16_engine):
    spec = SamplingSpec(max_tokens=10)
    prompt = PROMPTS["a1"]
    with_adapter, base = _generate(bf16_engine, [GenerateRequest("a1", prompt, 1, spec),
                                                 GenerateRequest(None, prompt, 1, spec)])
    assert with_adapter[0].tokens != base[0].tokens
