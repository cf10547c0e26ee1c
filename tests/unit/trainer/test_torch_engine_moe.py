"""Attention and unembedding LoRA on a tiny Qwen3-MoE, fused, against PEFT per adapter.

PEFT redirects dense-MLP names to the fused experts on Qwen3-MoE, so it cannot serve as
the reference for dense-MLP LoRA there; that path is the dense model's, tested elsewhere.
Expert LoRA is tested in test_expert_lora_vs_peft.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft_reference import peft_model as _peft_model
from peft_reference import peft_named_params as _peft_named_params
from peft_reference import randomize_b as _randomize_b
from peft_reference import rel as _rel
from test_torch_engine_vs_peft import RTOL, _datum, _peft_item

from tunemesh_trainer.domain import EngineItem, ItemKind, LoraSpec
from tunemesh_trainer.engine import build_torch_engine


@pytest.fixture(scope="module")
def moe_engine(tiny_moe_dir):
    return build_torch_engine(tiny_moe_dir, "tiny-moe", "moe", max_lora_rank=16, max_seq_len=32)


def test_moe_targets_skip_fused_experts_unless_asked(moe_engine):
    targets = moe_engine.target_modules(LoraSpec(train_attn=False, train_unembed=False))
    assert targets == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    spec = LoraSpec(rank=4, train_attn=False, train_mlp=False, train_unembed=False, train_experts=True)
    assert moe_engine.target_modules(spec) == ["model.layers.0.mlp.experts.down_proj",
                                               "model.layers.0.mlp.experts.gate_up_proj"]
    # 4 experts x rank 4: gate_up (64 -> 64) and down (32 -> 64)
    assert moe_engine.create_adapter("experts", spec) == 4 * 4 * (64 + 64) + 4 * 4 * (32 + 64)
    moe_engine.delete_adapter("experts")


def test_moe_fused_attention_lora_matches_peft(moe_engine, tiny_moe_dir):
    specs = {
        "m1": LoraSpec(rank=4, alpha=8, train_mlp=False, train_unembed=False, seed=11),
        "m2": LoraSpec(rank=8, alpha=8, train_mlp=False, seed=12),
    }
    rng, gen = np.random.default_rng(3), torch.Generator().manual_seed(3)
    items = []
    for adapter_id, spec in specs.items():
        moe_engine.create_adapter(adapter_id, spec)
        _randomize_b(moe_engine, adapter_id, gen)
        data = [_datum(rng, n, 0) for n in (4, 13)]
        items.append(EngineItem(f"i-{adapter_id}", adapter_id, ItemKind.FORWARD_BACKWARD, data))
    initial = {a: {n: t.clone() for n, t in moe_engine.adapter(a).weights().items()} for a in specs}

    outcomes = moe_engine.run_batch(items)

    for (adapter_id, spec), item, outcome in zip(specs.items(), items, outcomes):
        assert outcome.failure is None
        targets = moe_engine.target_modules(spec)
        peft = _peft_model(tiny_moe_dir, spec, targets, initial[adapter_id])
        loss, logprobs = _peft_item(peft, item.data)
        assert outcome.metrics["loss:sum"] == pytest.approx(float(loss.detach()), rel=RTOL)
        for got, want in zip(outcome.outputs, logprobs):
            assert _rel(got["logprobs"], want) <= RTOL
        loss.backward()
        grads = moe_engine.adapter(adapter_id).accumulated_grads()
        for name, param in _peft_named_params(peft, targets).items():
            assert _rel(grads[name], param.grad) <= RTOL, name
