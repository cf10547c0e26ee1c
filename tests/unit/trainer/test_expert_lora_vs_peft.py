"""Per-expert LoRA on fused 3-D MoE experts, fused over adapters, against PEFT per adapter
(`target_parameters` on the expert weights), on tiny-moe (Qwen3-MoE) and a tiny Mixtral."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft_reference import peft_expert_model, peft_factor, randomize_b, rel

from tunemesh_trainer.domain import DatumArrays, EngineItem, ItemKind, LoraSpec
from tunemesh_trainer.engine import build_torch_engine

RTOL = 1e-4
VOCAB = 256

# Some adapters train experts, some do not; one forward-only item rides along.
SPECS = {
    "ex-attn": (LoraSpec(rank=4, alpha=8, train_mlp=False, train_experts=True, seed=1), ItemKind.FORWARD_BACKWARD),
    "attn-only": (LoraSpec(rank=8, alpha=8, train_mlp=False, seed=2), ItemKind.FORWARD_BACKWARD),
    "ex-only": (LoraSpec(rank=2, alpha=16, train_attn=False, train_mlp=False, train_unembed=False,
                         train_experts=True, seed=3), ItemKind.FORWARD_BACKWARD),
    "ex-fwd": (LoraSpec(rank=4, alpha=4, train_mlp=False, train_unembed=False, train_experts=True, seed=4),
               ItemKind.FORWARD),
}


@pytest.fixture(scope="module")
def tiny_moe_model(tmp_path_factory):
    from tunemesh_common.models.tiny import build_moe

    directory = tmp_path_factory.mktemp("tunemesh-tiny-moe")
    build_moe(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_mixtral_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                           num_local_experts=5, num_experts_per_tok=2)
    torch.manual_seed(99)
    directory = tmp_path_factory.mktemp("tiny_mixtral")
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def _datum(rng: np.random.Generator, n: int) -> DatumArrays:
    return DatumArrays(
        tokens=rng.integers(0, VOCAB, n),
        loss_inputs={"target_tokens": rng.integers(0, VOCAB, n),
                     "weights": rng.uniform(-0.5, 1.5, n).astype(np.float32)},
    )


def _reference(model, data: list[DatumArrays]):
    """Each datum alone, unpadded: (item loss, per-datum logprobs)."""
    total, logprobs = 0.0, []
    for datum in data:
        logits = model(input_ids=torch.as_tensor(datum.tokens)[None]).logits[0]
        targets = torch.as_tensor(datum.loss_inputs["target_tokens"])
        lp = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
        total = total - (torch.as_tensor(datum.loss_inputs["weights"]) * lp).sum()
        logprobs.append(lp.detach().numpy())
    return total, logprobs


def _fused_batch(engine, seed: int):
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    items = []
    for adapter_id, (spec, kind) in SPECS.items():
        engine.create_adapter(adapter_id, spec)
        randomize_b(engine, adapter_id, gen)
        data = [_datum(rng, n) for n in rng.integers(3, 24, 2)]
        items.append(EngineItem(f"i-{adapter_id}", adapter_id, kind, data))
    initial = {a: {n: t.clone() for n, t in engine.adapter(a).weights().items()} for a in SPECS}
    return items, initial


@pytest.mark.parametrize("model_fixture", ["tiny_moe_model", "tiny_mixtral_dir"])
def test_fused_expert_lora_matches_peft(model_fixture, request):
    model_dir = request.getfixturevalue(model_fixture)
    engine = build_torch_engine(model_dir, "moe", "moe", max_lora_rank=16, max_seq_len=64)
    items, initial = _fused_batch(engine, seed=5)

    outcomes = engine.run_batch(items)

    for (adapter_id, (spec, kind)), item, outcome in zip(SPECS.items(), items, outcomes):
        assert outcome.failure is None
        targets = engine.target_modules(spec)
        assert any(".experts." in t for t in targets) == spec.train_experts
        peft = peft_expert_model(model_dir, spec, targets, initial[adapter_id])
        loss, logprobs = _reference(peft, item.data)
        assert rel(outcome.metrics["loss:sum"], float(loss.detach())) <= RTOL, adapter_id
        for got, want in zip(outcome.outputs, logprobs):
            assert rel(got["logprobs"], want) <= RTOL, adapter_id
        grads = engine.adapter(adapter_id).accumulated_grads()
        if kind is ItemKind.FORWARD:
            assert all(float(g.abs().max()) == 0.0 for g in grads.values())
            continue
        loss.backward()
        for name in grads:
            want = peft_factor(peft, name).grad
            assert float(want.abs().max()) > 0, name  # every factor is exercised
            assert rel(grads[name], want) <= RTOL, (adapter_id, name)


def test_router_weights_stay_frozen(tiny_moe_model):
    engine = build_torch_engine(tiny_moe_model, "moe", "moe", max_lora_rank=16, max_seq_len=64)
    items, _ = _fused_batch(engine, seed=6)
    engine.run_batch(items)
    model = engine.model
    routers = [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert routers and all(not p.requires_grad and p.grad is None for p in routers)
    assert not any(".gate." in n for a in SPECS for n in engine.adapter(a).weights())
