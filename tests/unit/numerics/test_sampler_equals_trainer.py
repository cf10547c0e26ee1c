"""The torch sampler and the trainer agree bit for bit (both in their default,
batch-invariant mode): every sampled token's logprob equals the trainer's `forward`
logprob of that token on the same checkpoint, greedy and with temperature, on the dense
and MoE tiny models (expert LoRA) and SmolLM2, over a float32 and a bfloat16 base; a
sampled row's tokens and logprobs do not depend on the rows sampled beside it; and an
on-policy `importance_sampling` step has ratios exactly 1 and moves the adapter exactly
as REINFORCE (cross_entropy weighted by the advantages) does."""

from __future__ import annotations

import asyncio
import pathlib

import numpy as np
import pytest
import torch

from numerics_fixtures import base_layers_on, export_peft, random_adapter, smollm2_dir, tiny_model_dir
from tunemesh_sampler.domain import GenerateRequest, SamplingSpec
from tunemesh_trainer.domain import AdamSpec, DatumArrays, EngineItem, ItemKind

MAX_SEQ_LEN = 256


def _engines(model_dir: pathlib.Path, family: str, dtype: str, adapter_dir: pathlib.Path, experts: bool):
    """A trainer with adapter `a` (random factors) and a sampler with the same adapter loaded."""
    from tunemesh_sampler.engine import build_torch_engine as build_sampler
    from tunemesh_trainer.engine import build_torch_engine as build_trainer

    trainer = build_trainer(model_dir, "m", family, max_lora_rank=8, max_seq_len=MAX_SEQ_LEN, num_threads=2,
                            dtype=dtype)
    random_adapter(trainer, "a", 8, seed=3, experts=experts)
    sampler = build_sampler(model_dir, "m", family, max_lora_rank=8, max_seq_len=MAX_SEQ_LEN, num_threads=2,
                            dtype=dtype)
    sampler.load_adapter("a", export_peft(trainer, "a", adapter_dir))
    return trainer, sampler


async def _sample(sampler, prompts, spec, adapter="a", num_samples=2):
    requests = [GenerateRequest(prompt_tokens=tuple(p), spec=spec, num_samples=num_samples, adapter_key=adapter,
                                tenant=f"t{i}") for i, p in enumerate(prompts)]
    return await asyncio.gather(*(sampler.generate(r) for r in requests))


def _forward_logprobs(trainer, sequence: list[int]) -> np.ndarray:
    """The trainer's logprob of each token of `sequence` after the first."""
    tokens, targets = np.array(sequence[:-1]), np.array(sequence[1:])
    item = EngineItem("f", "a", ItemKind.FORWARD,
                      [DatumArrays(tokens, {"target_tokens": targets, "weights": np.ones(len(tokens), np.float32)})])
    (outcome,) = trainer.run_batch([item])
    assert outcome.failure is None, outcome.failure
    return outcome.outputs[0]["logprobs"]


def _check_sampled_logprobs(trainer, prompts, results) -> int:
    checked = 0
    for prompt, sequences in zip(prompts, results, strict=True):
        for seq in sequences:
            assert seq.tokens, "nothing sampled"
            want = _forward_logprobs(trainer, [*prompt, *seq.tokens])[len(prompt) - 1:]
            assert np.array_equal(np.asarray(seq.logprobs, np.float32), want), (seq.logprobs, want)
            checked += len(seq.tokens)
    return checked


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n).tolist() for n in (3, 11, 30)]


@pytest.mark.parametrize("family,layers", [("dense", "mkl"), ("moe", "mkl"), ("dense", "onednn")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampled_logprobs_equal_the_trainers_forward_on_tiny_models(tmp_path, family, layers, dtype):
    trainer, sampler = _engines(tiny_model_dir(family, tmp_path / "models"), family, dtype, tmp_path / "a",
                                experts=family == "moe")
    try:
        with base_layers_on(layers):
            prompts = _prompts(256, 1)
            for spec in (SamplingSpec(max_tokens=12, temperature=0.0),
                         SamplingSpec(max_tokens=12, temperature=1.0, seed=7)):
                results = asyncio.run(_sample(sampler, prompts, spec))
                assert _check_sampled_logprobs(trainer, prompts, results) >= 12 * len(prompts)
    finally:
        sampler.close()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampled_logprobs_equal_the_trainers_forward_on_smollm2(tmp_path, dtype):
    trainer, sampler = _engines(smollm2_dir(), "dense", dtype, tmp_path / "a", experts=False)
    try:
        prompts = _prompts(49152, 2)
        results = asyncio.run(_sample(sampler, prompts, SamplingSpec(max_tokens=8, temperature=1.0, seed=5)))
        assert _check_sampled_logprobs(trainer, prompts, results) > 0
    finally:
        sampler.close()


@pytest.mark.parametrize("layers", ["mkl", "onednn"])
@pytest.mark.parametrize("samples", [3, 1], ids=["3-rows", "1-row"])
def test_a_sampled_row_does_not_depend_on_the_rows_beside_it(tmp_path, samples, layers):
    """One request alone (one row: every GEMM of its decode steps has a single row), then
    with other tenants' longer and shorter prompts arriving in the same step and later (rows
    joining and leaving the running decode loop); alone, its logprobs are the trainer's."""
    with base_layers_on(layers):
        trainer, sampler = _engines(tiny_model_dir("dense", tmp_path / "models"), "dense", "float32", tmp_path / "a",
                                    experts=False)
        spec = SamplingSpec(max_tokens=16, temperature=1.0, seed=11)
        mine = [5, 9, 14, 3]
        try:
            (alone,) = asyncio.run(_sample(sampler, [mine], spec, num_samples=samples))
            assert _check_sampled_logprobs(trainer, [mine], [alone]) > 0

            async def crowded():
                rng = np.random.default_rng(3)
                first = [sampler.generate(GenerateRequest(prompt_tokens=tuple(rng.integers(1, 256, n).tolist()),
                                                          spec=SamplingSpec(max_tokens=m, temperature=1.0, seed=n),
                                                          num_samples=2, adapter_key=key, tenant=f"o{n}"))
                         for n, m, key in ((40, 30, None), (2, 3, "a"), (17, 9, None))]
                tasks = [asyncio.ensure_future(c) for c in first]
                await asyncio.sleep(0)
                own = asyncio.ensure_future(sampler.generate(GenerateRequest(
                    prompt_tokens=tuple(mine), spec=spec, num_samples=samples, adapter_key="a", tenant="me")))
                await asyncio.sleep(0.05)  # later rows join a running loop
                late = [sampler.generate(GenerateRequest(
                    prompt_tokens=tuple(rng.integers(1, 256, 25).tolist()), spec=SamplingSpec(max_tokens=20, temperature=0.0),
                    num_samples=4, adapter_key="a", tenant="late"))]
                await asyncio.gather(*tasks, *late)
                return await own

            shared = asyncio.run(crowded())
            for a, b in zip(alone, shared, strict=True):
                assert a.tokens == b.tokens
                assert np.array_equal(np.asarray(a.logprobs, np.float32), np.asarray(b.logprobs, np.float32))
        finally:
            sampler.close()


def test_on_policy_importance_sampling_has_ratio_one_and_equals_reinforce(tmp_path):
    """Sample, then train twin adapters on the samples: one with importance_sampling and
    the sampler's logprobs, one with REINFORCE (cross_entropy weighted by the advantage).
    The ratios are exactly 1, and after an optimizer step the twins are bit-identical."""
    trainer, sampler = _engines(tiny_model_dir("dense", tmp_path / "models"), "dense", "float32", tmp_path / "a",
                                experts=False)
    try:
        prompts = _prompts(256, 4)
        results = asyncio.run(_sample(sampler, prompts, SamplingSpec(max_tokens=10, temperature=1.0, seed=3)))
        state = trainer.export_adapter("a", with_optimizer=False)
        trainer.create_adapter("twin", state.spec)
        trainer.import_adapter("twin", state)
        rl_data, ce_data = [], []
        for i, (prompt, sequences) in enumerate(zip(prompts, results)):
            for seq in sequences:
                full = [*prompt, *seq.tokens]
                n = len(full) - 1
                mask = np.zeros(n, np.float32)
                mask[len(prompt) - 1:] = 1.0
                advantage = mask * (0.5 - i * 0.4)
                sampled = np.zeros(n, np.float32)
                sampled[len(prompt) - 1:] = seq.logprobs
                tokens, targets = np.array(full[:-1]), np.array(full[1:])
                rl_data.append(DatumArrays(tokens, {"target_tokens": targets, "logprobs": sampled,
                                                    "advantages": advantage}))
                ce_data.append(DatumArrays(tokens, {"target_tokens": targets, "weights": advantage}))
        rl, ce = trainer.run_batch([EngineItem("rl", "a", ItemKind.FORWARD_BACKWARD, rl_data,
                                               loss_fn="importance_sampling"),
                                    EngineItem("ce", "twin", ItemKind.FORWARD_BACKWARD, ce_data,
                                               loss_fn="cross_entropy")])
        assert rl.failure is None and ce.failure is None
        for datum, out in zip(rl_data, rl.outputs, strict=True):
            on = datum.loss_inputs["advantages"] != 0
            ratio = np.exp(out["logprobs"][on] - datum.loss_inputs["logprobs"][on])
            assert np.array_equal(ratio, np.ones_like(ratio))
        for adapter in ("a", "twin"):
            trainer.optim_step(adapter, AdamSpec(learning_rate=1e-2))
        weights, twin = trainer.adapter("a").weights(), trainer.adapter("twin").weights()
        for name, tensor in weights.items():
            assert torch.equal(tensor, twin[name]), name
    finally:
        sampler.close()
