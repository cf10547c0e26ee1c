"""Batch invariance of the torch sampler, as a property: a request's sampled tokens and
their logprobs are bit-identical alone and in a random crowd (other tenants, other
adapters and the base model, other prompt lengths and budgets, greedy and sampled rows,
some arriving while it decodes), on the dense and MoE tiny models, float32 and bfloat16, the
base layers on MKL (as tiny layers run) and on oneDNN (as SmolLM2's do)."""

from __future__ import annotations

import asyncio
import functools
import pathlib
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from numerics_fixtures import base_layers_on, export_peft, random_adapter, tiny_model_dir
from tunemesh_sampler.domain import GenerateRequest, SamplingSpec

VOCAB = 256


@functools.cache
def _sampler(kind: str, dtype: str):
    from tunemesh_sampler.engine import build_torch_engine as build_sampler
    from tunemesh_trainer.engine import build_torch_engine as build_trainer

    root = pathlib.Path(tempfile.mkdtemp(prefix="tunemesh-sampler-invariance-"))
    model_dir = tiny_model_dir(kind, root / "models")
    trainer = build_trainer(model_dir, "m", kind, max_lora_rank=8, max_seq_len=256, num_threads=2, dtype=dtype)
    sampler = build_sampler(model_dir, "m", kind, max_lora_rank=8, max_seq_len=256, num_threads=2, dtype=dtype,
                            max_batch_rows=12)
    for seed, (adapter, rank) in enumerate((("a", 8), ("b", 4))):
        random_adapter(trainer, adapter, rank, seed=seed + 5, experts=kind == "moe")
        sampler.load_adapter(adapter, export_peft(trainer, adapter, root / adapter))
    return sampler


def _request(tokens, max_tokens, temperature, adapter, tenant, samples=1, seed=0) -> GenerateRequest:
    return GenerateRequest(prompt_tokens=tuple(tokens), spec=SamplingSpec(max_tokens=max_tokens,
                                                                          temperature=temperature, seed=seed),
                           num_samples=samples, adapter_key=adapter, tenant=tenant)


other = st.tuples(st.integers(1, 60), st.integers(1, 24), st.sampled_from([0.0, 1.0]),
                  st.sampled_from([None, "a", "b"]), st.integers(1, 3), st.booleans())


@pytest.mark.parametrize("kind,dtype,layers", [("dense", "float32", "mkl"), ("dense", "bfloat16", "mkl"),
                                               ("moe", "float32", "mkl"), ("dense", "float32", "onednn"),
                                               ("moe", "float32", "onednn")])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mine_len=st.integers(1, 40), temperature=st.sampled_from([0.0, 1.0]), others=st.lists(other, max_size=5),
       seed=st.integers(0, 10_000))
def test_a_request_is_bit_identical_alone_and_in_any_crowd(kind, dtype, layers, mine_len, temperature, others, seed):
    sampler = _sampler(kind, dtype)
    rng = np.random.default_rng(seed)
    mine = _request(rng.integers(1, VOCAB, mine_len).tolist(), 12, temperature, "a", "me", samples=2, seed=seed)
    crowd = [(_request(rng.integers(1, VOCAB, n).tolist(), m, t, adapter, f"o{i}", samples, seed + i), late)
             for i, (n, m, t, adapter, samples, late) in enumerate(others)]

    async def alone():
        return await sampler.generate(mine)

    async def crowded():
        early = [asyncio.ensure_future(sampler.generate(r)) for r, late in crowd if not late]
        own = asyncio.ensure_future(sampler.generate(mine))
        await asyncio.sleep(0.01)
        late = [asyncio.ensure_future(sampler.generate(r)) for r, late in crowd if late]
        await asyncio.gather(*early, *late)
        return await own

    with base_layers_on(layers):
        want, got = asyncio.run(alone()), asyncio.run(crowded())
    for a, b in zip(want, got, strict=True):
        assert a.tokens == b.tokens
        assert np.array_equal(np.asarray(a.logprobs, np.float32), np.asarray(b.logprobs, np.float32))
