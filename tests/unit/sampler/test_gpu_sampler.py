"""GPU-only: the sampling engines on CUDA give the CPU torch engine's answers.

- the torch engine on tiny-dense, fp32 with TF32 off, adapters loaded: greedy tokens equal,
  logprobs (sampled and prompt) within 1e-4;
- the vLLM engine (`vllm` on CUDA, fp32) against the torch engine on CUDA on SmolLM2-135M
  with an adapter: greedy tokens equal (logprobs loosely: vLLM's CUDA kernels accumulate in
  another order).

Skipped on machines without a CUDA device (CI runs on CPU), and the vLLM test also without
vllm or without SmolLM2 in the model cache."""

from __future__ import annotations

import asyncio
import os
import pathlib

import numpy as np
import pytest
import torch

from peft_reference import save_random_peft_adapter

from tunemesh_sampler.domain import GenerateRequest, SamplingSpec

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_cuda_matmuls"),
              pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
GREEDY = SamplingSpec(max_tokens=12, temperature=0.0)
KEYS = (None, "a1", "a2")



def _prompts(vocab_size: int, seed: int = 0) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(t) for t in rng.integers(3, vocab_size, n)) for n in (5, 11, 17)]


def _answers(engine, keys, prompts):
    async def run():
        requests = [GenerateRequest(key, prompt, 1, GREEDY) for key in keys for prompt in prompts]
        generated = await asyncio.gather(*(engine.generate(r) for r in requests))
        scored = await asyncio.gather(*(engine.prompt_logprobs(r.adapter_key, r.prompt_tokens) for r in requests))
        return [(g, s) for (g,), s in zip(generated, scored, strict=True)]

    return asyncio.run(run())


def test_torch_engine_on_cuda_matches_cpu(engine, model_dir, adapter_dirs):
    """`engine` is the session's CPU torch engine (tests/unit/sampler/conftest.py)."""
    from tunemesh_sampler.engine import build_torch_engine

    cuda = build_torch_engine(model_dir, name="tiny", family="dense", max_lora_rank=engine.info.max_lora_rank,
                              max_seq_len=engine.info.max_seq_len, device="cuda", dtype="float32")
    try:
        for key, directory in adapter_dirs.items():
            cuda.load_adapter(key, directory)
        prompts = _prompts(engine.info.vocab_size)
        want, got = _answers(engine, KEYS, prompts), _answers(cuda, KEYS, prompts)
    finally:
        cuda.close()
    for (g_seq, g_scored), (w_seq, w_scored) in zip(got, want, strict=True):
        assert g_seq.tokens == w_seq.tokens
        np.testing.assert_allclose(g_seq.logprobs, w_seq.logprobs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(g_scored, w_scored, atol=1e-4, rtol=0)
    assert got[0][0].tokens != got[len(prompts)][0].tokens  # the adapter changes the output


def _smollm2():
    from tunemesh_common.models import SMOLLM2, ModelRegistry

    data_dir = pathlib.Path(os.environ.get("TUNEMESH_DATA_DIR", "~/.cache/tunemesh")).expanduser()
    registry = ModelRegistry.default(data_dir)
    try:
        return registry.entry(SMOLLM2), registry.materialize(SMOLLM2)
    except Exception as err:  # not cached and not installable offline
        pytest.skip(f"SmolLM2 is not available: {err}")


def test_vllm_engine_on_cuda_matches_the_torch_engine_greedy(tmp_path):
    pytest.importorskip("vllm")
    from tunemesh_sampler.engine import build_torch_engine, build_vllm_engine

    entry, model_dir = _smollm2()
    adapter = save_random_peft_adapter(model_dir, tmp_path / "a1", seed=1,
                                       targets=["q_proj", "v_proj", "down_proj"])
    kwargs = dict(name=entry.name, family=entry.family, max_lora_rank=8, max_seq_len=256)
    vllm_engine = build_vllm_engine(model_dir, max_adapters=2, dtype="float32", kv_cache_fraction=0.3, **kwargs)
    torch_engine = build_torch_engine(model_dir, device="cuda", dtype="float32", **kwargs)
    try:
        for built in (vllm_engine, torch_engine):
            built.load_adapter("a1", adapter)
        prompts = _prompts(entry.vocab_size, seed=1)
        got, want = _answers(vllm_engine, (None, "a1"), prompts), _answers(torch_engine, (None, "a1"), prompts)
    finally:
        vllm_engine.close()
        torch_engine.close()
    for (g_seq, g_scored), (w_seq, w_scored) in zip(got, want, strict=True):
        assert g_seq.tokens == w_seq.tokens
        np.testing.assert_allclose(g_seq.logprobs, w_seq.logprobs, atol=5e-3, rtol=0)
        np.testing.assert_allclose(g_scored, w_scored, atol=5e-3, rtol=0)
    assert got[0][0].tokens != got[len(prompts)][0].tokens  # the adapter changes the output
