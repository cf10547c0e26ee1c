"""A bfloat16 base: the LoRA factors, gradients, optimizer and losses stay float32, and the
numbers follow the float32 engine's within bfloat16 precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tunemesh.errors import InvalidArgumentError
from tunemesh_trainer.domain import AdamSpec, DatumArrays, EngineItem, ItemKind, LoraSpec
from tunemesh_trainer.engine import build_torch_engine

SPEC = LoraSpec(rank=4, alpha=8, seed=1, train_experts=True)


def _engine(model_dir, dtype: str):
    engine = build_torch_engine(model_dir, name="tiny", family="moe", max_lora_rank=8, max_seq_len=48,
                                num_threads=1, dtype=dtype)
    engine.create_adapter("a", SPEC)
    return engine


def _batch() -> list[EngineItem]:
    rng = np.random.default_rng(5)
    data = [DatumArrays(rng.integers(0, 256, n), {"target_tokens": rng.integers(0, 256, n),
                                                  "weights": np.ones(n, np.float32)}) for n in (12, 30)]
    return [EngineItem("i", "a", ItemKind.FORWARD_BACKWARD, data)]


def test_bf16_base_trains_float32_lora_close_to_the_fp32_engine(tiny_moe_dir):
    fp32, bf16 = _engine(tiny_moe_dir, "float32"), _engine(tiny_moe_dir, "bfloat16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    want, got = fp32.run_batch(_batch())[0], bf16.run_batch(_batch())[0]
    assert got.failure is None
    assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=2e-2)
    assert got.outputs[1]["logprobs"].dtype == np.float32
    np.testing.assert_allclose(got.outputs[1]["logprobs"], want.outputs[1]["logprobs"], atol=0.15)
    want_grads, got_grads = (e.adapter("a").accumulated_grads() for e in (fp32, bf16))
    assert {g.dtype for g in got_grads.values()} == {torch.float32}
    want_flat = torch.cat([want_grads[name].reshape(-1) for name in sorted(want_grads)])
    got_flat = torch.cat([got_grads[name].reshape(-1) for name in sorted(want_grads)])
    assert float((got_flat - want_flat).norm() / want_flat.norm()) < 0.03  # a routing flip moves one expert
    for engine in (fp32, bf16):
        engine.optim_step("a", AdamSpec(learning_rate=1e-2))
    weights = bf16.export_adapter("a", with_optimizer=True)
    assert all(w.dtype == np.float32 and np.isfinite(w).all() for w in weights.weights.values())


def test_unknown_base_dtype_is_refused(tiny_moe_dir):
    with pytest.raises(InvalidArgumentError) as err:
        _engine(tiny_moe_dir, "float16")
    assert err.value.reason == "BAD_DTYPE"
