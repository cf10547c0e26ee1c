"""GPU-only: vLLM's batch-invariant mode (`VLLM_BATCH_INVARIANT`, the vLLM engine's
`batch_invariant=True`) gives a row the same tokens and logprobs alone and in a batch, on
SmolLM2-135M in bfloat16 with a trainer adapter of random factors: greedy and at temperature
1 with a seed, beside other rows of other lengths, adapters and sampling settings, some
joining while it decodes.

The row's distance to the trainer's `forward` logprobs (the trainer on CPU, same dtype) is
reported, not asserted: vLLM's kernels are not the trainer's (bench/vllm_vs_trainer.py
measures it on CPU). Reported as junit properties and printed (`pytest -s`).

Skipped without a CUDA device, without vllm, or without SmolLM2 in the model cache. The
mode refuses to start on CPU, which the last test checks wherever vllm is installed."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from numerics_fixtures import export_peft, random_adapter, smollm2_dir
from tunemesh_sampler.domain import GenerateRequest, SamplingSpec
from tunemesh_trainer.domain import DatumArrays, EngineItem, ItemKind

CUDA = torch.cuda.is_available()
MAX_SEQ_LEN = 256
DTYPE = "bfloat16"
# under one KV block (16 tokens): the second run of the same prompt finds nothing in the
# prefix cache, so "alone" and "in a batch" run the same prefill
MINE = (1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511)
SPECS = {"greedy": SamplingSpec(max_tokens=24, temperature=0.0),
         "temperature_1": SamplingSpec(max_tokens=24, temperature=1.0, seed=11)}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """The trainer (CPU) with adapter `a` of random factors, and vLLM on the GPU in its
    batch-invariant mode with the same adapter loaded."""
    pytest.importorskip("vllm")
    from tunemesh_sampler.engine import build_vllm_engine
    from tunemesh_trainer.engine import build_torch_engine as build_trainer

    model_dir = smollm2_dir()
    trainer = build_trainer(model_dir, "m", "dense", max_lora_rank=8, max_seq_len=MAX_SEQ_LEN, dtype=DTYPE)
    random_adapter(trainer, "a", 8, seed=3)
    adapter = export_peft(trainer, "a", tmp_path_factory.mktemp("adapter"))
    engine = build_vllm_engine(model_dir, "m", "dense", max_lora_rank=8, max_seq_len=MAX_SEQ_LEN, max_adapters=2,
                               dtype=DTYPE, kv_cache_fraction=0.3, batch_invariant=True)
    try:
        engine.load_adapter("a", adapter)
        yield trainer, engine
    finally:
        engine.close()


def _request(prompt, spec, adapter="a", tenant="me") -> GenerateRequest:
    return GenerateRequest(adapter_key=adapter, prompt_tokens=tuple(prompt), num_samples=1, spec=spec, tenant=tenant)


async def _crowded(engine, spec):
    """MINE beside rows of other lengths, adapters and settings, some arriving while it decodes."""
    rng = np.random.default_rng(5)
    others = [_request(rng.integers(3, 49152, n).tolist(), SamplingSpec(max_tokens=m, temperature=t, seed=n),
                       adapter=key, tenant=f"o{n}")
              for n, m, t, key in ((40, 30, 1.0, None), (3, 4, 0.0, "a"), (130, 12, 1.0, "a"), (17, 40, 0.0, None))]
    first = [asyncio.ensure_future(engine.generate(r)) for r in others]
    await asyncio.sleep(0)
    mine = asyncio.ensure_future(engine.generate(_request(MINE, spec)))
    await asyncio.sleep(0.02)  # later rows join the running steps
    late = [engine.generate(_request(rng.integers(3, 49152, 60).tolist(), SamplingSpec(max_tokens=20), tenant="l"))
            for _ in range(6)]
    await asyncio.gather(*first, *late)
    return await mine


def _trainer_logprobs(trainer, tokens) -> np.ndarray:
    item = EngineItem("f", "a", ItemKind.FORWARD, [DatumArrays(np.array(tokens[:-1]), {
        "target_tokens": np.array(tokens[1:]), "weights": np.ones(len(tokens) - 1, np.float32)})])
    (outcome,) = trainer.run_batch([item])
    assert outcome.failure is None, outcome.failure
    return outcome.outputs[0]["logprobs"]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", list(SPECS))
def test_a_row_is_the_same_alone_and_in_a_batch(engines, mode, record_property):
    trainer, engine = engines
    spec = SPECS[mode]
    (alone,) = asyncio.run(engine.generate(_request(MINE, spec)))
    (shared,) = asyncio.run(_crowded(engine, spec))
    assert alone.tokens, "nothing sampled"
    assert shared.tokens == alone.tokens
    assert np.array_equal(np.asarray(shared.logprobs, np.float32), np.asarray(alone.logprobs, np.float32))

    want = _trainer_logprobs(trainer, [*MINE, *alone.tokens])[len(MINE) - 1:]
    diff = np.abs(np.asarray(alone.logprobs, np.float64) - want)
    record_property(f"vllm_vs_trainer_{mode}_max_abs", float(diff.max()))
    record_property(f"vllm_vs_trainer_{mode}_mean_abs", float(diff.mean()))
    print(f"\nvLLM (batch-invariant, {DTYPE}, GPU) vs trainer ({DTYPE}, CPU), {mode}: per-token |logprob diff| "
          f"max {diff.max():.3g} mean {diff.mean():.3g} over {diff.size} tokens")


@pytest.mark.skipif(CUDA, reason="checks the refusal on CPU hosts")
def test_the_mode_refuses_to_start_without_a_gpu(tmp_path):
    """vLLM's batch-invariant kernels are Triton ones, which the CPU build cannot run."""
    from tunemesh.errors import FailedPreconditionError
    from tunemesh_sampler.engine import build_vllm_engine

    with pytest.raises(FailedPreconditionError, match="GPU"):
        build_vllm_engine(tmp_path, "m", "dense", max_lora_rank=8, max_seq_len=64, batch_invariant=True)



def test_the_sampler_setting_reaches_vllm_and_leaves_the_torch_engine_alone(monkeypatch, tmp_path):
    """`--vllm-batch-invariant` (default off) is what the vLLM engine is started with;
    `--batch-invariant` (default on) is the torch engine's and never reaches vLLM."""
    from tunemesh_common.service import settings
    from tunemesh_sampler import __main__ as sampler_main
    from tunemesh_sampler import engine as engines
    from tunemesh_sampler.engine import vllm_engine
    from tunemesh_sampler.settings import SamplerSettings

    started = []
    monkeypatch.setattr(vllm_engine, "can_serve", lambda *args: None)
    monkeypatch.setattr(engines, "build_vllm_engine", lambda *args, **kwargs: started.append(kwargs))
    for argv in ([], ["--vllm-batch-invariant", "true"]):
        s = settings.load(SamplerSettings, ["--engine", "vllm", "--model", "tunemesh/tiny-dense",
                                            "--data-dir", str(tmp_path), *argv])
        sampler_main.build_engine(s)
    assert [kwargs["batch_invariant"] for kwargs in started] == [False, True]
