"""Adapter state through checkpoint files: exact resume, weights-only restart, PEFT load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tunemesh_common.lora import peft_format
from tunemesh.errors import FailedPreconditionError, InvalidArgumentError
from tunemesh_trainer import checkpoint_files
from tunemesh_trainer.domain import AdamSpec, DatumArrays, EngineItem, ItemKind, LoraSpec
from tunemesh_trainer.engine import build_torch_engine

SPEC = LoraSpec(rank=4, alpha=8, seed=11)
ADAM = AdamSpec(learning_rate=1e-2, weight_decay=0.01)


@pytest.fixture(scope="module")
def engine(tiny_dense_dir):
    return build_torch_engine(tiny_dense_dir, "tunemesh/tiny-dense", "dense", max_lora_rank=32, max_seq_len=64)


def _batch(step: int) -> list[DatumArrays]:
    rng = np.random.default_rng(100 + step)
    data = []
    for n in (7, 12):
        data.append(DatumArrays(rng.integers(0, 256, n), {
            "target_tokens": rng.integers(0, 256, n), "weights": np.ones(n, dtype=np.float32)}))
    return data


def _train(engine, adapter_id: str, steps: range) -> list[float]:
    losses = []
    for step in steps:
        item = EngineItem(f"{adapter_id}-{step}", adapter_id, ItemKind.FORWARD_BACKWARD, _batch(step))
        (outcome,) = engine.run_batch([item])
        assert outcome.failure is None
        losses.append(outcome.metrics["loss:sum"])
        engine.optim_step(adapter_id, ADAM)
    return losses


def _roundtrip(engine, adapter_id: str, with_optimizer: bool):
    state = engine.export_adapter(adapter_id, with_optimizer)
    files = {name: b"".join(parts) for name, parts in checkpoint_files.encode(state, "tunemesh/tiny-dense").items()}
    return files, checkpoint_files.decode(files, state.spec, with_optimizer)


def _weights(engine, adapter_id: str) -> dict[str, np.ndarray]:
    return {n: t.numpy().copy() for n, t in engine.adapter(adapter_id).weights().items()}


def test_resume_with_optimizer_is_bit_identical_and_weights_only_is_not(engine):
    for adapter_id in ("twin", "resumed", "weights-only"):
        engine.create_adapter(adapter_id, SPEC)
    _train(engine, "twin", range(3))
    _, state = _roundtrip(engine, "twin", with_optimizer=True)
    assert state.steps == 3
    assert engine.import_adapter("resumed", state) == 3
    _, weights_only = _roundtrip(engine, "twin", with_optimizer=False)
    assert engine.import_adapter("weights-only", weights_only) == 0
    assert engine.adapter_digest("resumed") == engine.adapter_digest("twin")

    twin = _train(engine, "twin", range(3, 6))
    resumed = _train(engine, "resumed", range(3, 6))
    restarted = _train(engine, "weights-only", range(3, 6))

    assert resumed == twin  # exact floats, not approx
    assert engine.adapter_digest("resumed") == engine.adapter_digest("twin")
    for name, value in _weights(engine, "twin").items():
        np.testing.assert_array_equal(_weights(engine, "resumed")[name], value)
    assert restarted[0] == twin[0]  # same weights before the first new step
    assert restarted[1:] != twin[1:]  # fresh AdamW moments take a different step
    assert any(not np.array_equal(_weights(engine, "weights-only")[n], v) for n, v in _weights(engine, "twin").items())


def test_files_load_in_peft_and_give_the_trainers_logits(engine, tiny_dense_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine.create_adapter("export", SPEC)
    _train(engine, "export", range(2))
    files, _ = _roundtrip(engine, "export", with_optimizer=False)
    assert set(files) == {peft_format.CONFIG_FILE, peft_format.WEIGHTS_FILE}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    config = json.loads(files[peft_format.CONFIG_FILE])
    assert config["r"] == SPEC.rank and config["lora_alpha"] == SPEC.alpha

    base = AutoModelForCausalLM.from_pretrained(tiny_dense_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp_path).eval()
    tokens = np.arange(3, 40) % 256
    item = EngineItem("score", "export", ItemKind.FORWARD, [DatumArrays(tokens, {
        "target_tokens": np.roll(tokens, -1), "weights": np.ones(len(tokens), dtype=np.float32)})])
    (outcome,) = engine.run_batch([item])
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(tokens)[None]).logits[0]
    want = torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(np.roll(tokens, -1))[:, None])[:, 0]
    np.testing.assert_allclose(outcome.outputs[0]["logprobs"], want.numpy(), rtol=1e-5, atol=1e-5)
    zero_lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dense_dir), tmp_path)
    for module in zero_lora.modules():  # the check can fail: without the adapter, logits differ
        if hasattr(module, "lora_B"):
            torch.nn.init.zeros_(module.lora_B["default"].weight)
    with torch.no_grad():
        base_logits = zero_lora(input_ids=torch.as_tensor(tokens)[None]).logits[0]
    assert not torch.allclose(base_logits, logits, atol=1e-4)


def test_partial_adapter_fills_missing_modules_with_zeros(engine):
    engine.create_adapter("full", SPEC)
    engine.create_adapter("partial", SPEC)
    state = engine.export_adapter("full", with_optimizer=False)
    q_only = {n: a for n, a in state.weights.items() if ".q_proj." in n}
    state.weights = {n: a + 0.5 for n, a in q_only.items()}
    engine.import_adapter("partial", state)
    weights = _weights(engine, "partial")
    for name, value in weights.items():
        if ".q_proj." in name:
            np.testing.assert_array_equal(value, q_only[name] + 0.5)
        else:
            assert not value.any(), name


def test_mismatched_state_is_refused_and_leaves_the_adapter_untouched(engine):
    engine.create_adapter("target", SPEC)
    engine.create_adapter("other-rank", LoraSpec(rank=8, alpha=8, seed=1))
    before = engine.adapter_digest("target")
    with pytest.raises(FailedPreconditionError, match="rank"):
        engine.import_adapter("target", engine.export_adapter("other-rank", True))
    bad = engine.export_adapter("target", False)
    name = next(iter(bad.weights))
    bad.weights[name] = np.full_like(bad.weights[name], np.nan)
    with pytest.raises(InvalidArgumentError, match="not finite"):
        engine.import_adapter("target", bad)
    attn_only = LoraSpec(rank=4, alpha=8, train_mlp=False, train_unembed=False)
    engine.create_adapter("attn-only", attn_only)
    with pytest.raises(FailedPreconditionError, match="no LoRA on"):
        engine.import_adapter("attn-only", engine.export_adapter("target", False))
    assert engine.adapter_digest("target") == before


def test_decode_refuses_missing_optimizer_state(engine):
    engine.create_adapter("plain", SPEC)
    files, _ = _roundtrip(engine, "plain", with_optimizer=False)
    with pytest.raises(InvalidArgumentError, match="no optimizer state"):
        checkpoint_files.decode(files, SPEC, with_optimizer=True)
