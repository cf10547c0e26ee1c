"""The fused multi-LoRA step against HF PEFT run on each adapter alone (fp32)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tunemesh_trainer.domain import AdamSpec, DatumArrays, EngineItem, ItemKind, LoraSpec
from tunemesh_trainer.engine import build_torch_engine
from peft_reference import peft_model, peft_named_params, randomize_b, rel

RTOL = 1e-5


@dataclasses.dataclass
class Case:
    adapter_id: str
    spec: LoraSpec
    lengths: list[int]
    kind: ItemKind = ItemKind.FORWARD_BACKWARD
    k: int = 0  # targets (N, K) when > 0
    adam: AdamSpec | None = None


CASES = [
    Case("a", LoraSpec(rank=4, alpha=8, seed=1), [5, 12],
         adam=AdamSpec(learning_rate=1e-2, weight_decay=0.1)),
    Case("b", LoraSpec(rank=8, alpha=0, train_mlp=False, train_unembed=False, seed=2), [20], k=3,
         adam=AdamSpec(learning_rate=3e-3, beta1=0.8, beta2=0.99, eps=1e-8, grad_clip_norm=0.05)),
    Case("c", LoraSpec(rank=2, alpha=16, train_attn=False, seed=3), [3, 7, 16],
         adam=AdamSpec(learning_rate=1e-3)),
    Case("d", LoraSpec(rank=16, alpha=32, train_mlp=False, seed=4), [9, 1],
         adam=AdamSpec(learning_rate=5e-3, weight_decay=0.01, grad_clip_norm=100.0)),
    Case("e", LoraSpec(rank=4, alpha=4, train_unembed=False, seed=5), [6, 11], kind=ItemKind.FORWARD),
]


def _datum(rng: np.random.Generator, n: int, k: int) -> DatumArrays:
    shape = (n, k) if k else (n,)
    return DatumArrays(
        tokens=rng.integers(0, 256, n),
        loss_inputs={
            "target_tokens": rng.integers(0, 256, shape),
            "weights": rng.uniform(-0.5, 1.5, shape).astype(np.float32),
        },
    )


def _peft_item(model, data: list[DatumArrays]):
    """Each datum alone, unpadded: (item loss, per-datum logprobs)."""
    total, logprobs = 0.0, []
    for datum in data:
        logits = model(input_ids=torch.as_tensor(datum.tokens)[None]).logits[0]
        targets = torch.as_tensor(datum.loss_inputs["target_tokens"])
        lp = torch.log_softmax(logits, -1).gather(-1, targets.reshape(len(targets), -1)).reshape(targets.shape)
        total = total - (torch.as_tensor(datum.loss_inputs["weights"]) * lp).sum()
        logprobs.append(lp.detach().numpy())
    return total, logprobs


def test_fused_step_matches_peft_per_adapter(tiny_dense_dir):
    engine = build_torch_engine(tiny_dense_dir, "tiny", "dense", max_lora_rank=32, max_seq_len=64)
    rng, gen = np.random.default_rng(7), torch.Generator().manual_seed(7)
    items = []
    for case in CASES:
        engine.create_adapter(case.adapter_id, case.spec)
        randomize_b(engine, case.adapter_id, gen)
        data = [_datum(rng, n, case.k) for n in case.lengths]
        items.append(EngineItem(f"item-{case.adapter_id}", case.adapter_id, case.kind, data))
    initial = {c.adapter_id: engine.adapter(c.adapter_id).weights() for c in CASES}
    initial = {a: {n: t.clone() for n, t in w.items()} for a, w in initial.items()}

    outcomes = engine.run_batch(items)

    for case, item, outcome in zip(CASES, items, outcomes):
        assert outcome.failure is None
        targets = engine.target_modules(case.spec)
        peft = peft_model(tiny_dense_dir, case.spec, targets, initial[case.adapter_id])
        loss, logprobs = _peft_item(peft, item.data)
        assert outcome.metrics["loss:sum"] == pytest.approx(float(loss.detach()), rel=RTOL)
        for got, want in zip(outcome.outputs, logprobs):
            assert got["logprobs"].shape == want.shape
            assert rel(got["logprobs"], want) <= RTOL
        if case.kind is ItemKind.FORWARD:
            assert all(float(g.abs().max()) == 0.0 for g in engine.adapter(case.adapter_id).accumulated_grads().values())
            continue
        _check_grads_and_step(engine, case, peft, targets, loss)


def _check_grads_and_step(engine, case: Case, peft, targets: list[str], loss: torch.Tensor) -> None:
    params = peft_named_params(peft, targets)
    loss.backward()
    grads = engine.adapter(case.adapter_id).accumulated_grads()
    assert set(grads) == set(params)
    for name, param in params.items():
        assert float(param.grad.abs().max()) > 0, name
        assert rel(grads[name], param.grad) <= RTOL, name

    adam = case.adam
    metrics = engine.optim_step(case.adapter_id, adam)
    names = sorted(params)
    reference = torch.optim.AdamW(
        [params[n] for n in names], lr=adam.learning_rate, betas=(adam.beta1, adam.beta2),
        eps=adam.eps, weight_decay=adam.weight_decay,
    )
    norm = torch.nn.utils.clip_grad_norm_([params[n] for n in names], adam.grad_clip_norm or float("inf"))
    reference.step()
    assert metrics["grad_norm:max"] == pytest.approx(float(norm), rel=RTOL)
    assert metrics["step:max"] == 1.0
    weights = engine.adapter(case.adapter_id).weights()
    for name in names:
        assert rel(weights[name], params[name].detach()) <= RTOL, name
