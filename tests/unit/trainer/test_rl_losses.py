"""RL losses against per-token references written plainly, alone and in a fused batch.

The references loop over tokens with Python floats (loss) and the hand-derived
derivative d loss / d lp (gradient), so they share no code with the trainer's vectorised
losses. In the fused test five tenants' adapters, each with another loss, run in one
batch; each adapter's loss and LoRA gradients are checked against HF PEFT on that
adapter alone with the per-token reference loss.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from peft_reference import peft_model, peft_named_params, randomize_b, rel
from tunemesh.errors import InvalidArgumentError
from tunemesh_common.training.loss_specs import SPECS
from tunemesh_trainer.domain import DatumArrays, EngineItem, ItemKind, LoraSpec
from tunemesh_trainer.engine import build_torch_engine
from tunemesh_trainer.engine.losses import LOSSES


def reference(loss_fn: str, lp: float, q: float, a: float, config: dict[str, float]) -> tuple[float, float]:
    """One token's loss and d loss / d lp, from the definitions."""
    ratio = math.exp(lp - q)
    if loss_fn == "importance_sampling":
        return -ratio * a, -ratio * a
    if loss_fn == "ppo":
        lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
        clipped = min(max(ratio, lo), hi)
        unclipped_term, clipped_term = ratio * a, clipped * a
        if unclipped_term <= clipped_term:  # min picks the unclipped term: gradient flows
            return -unclipped_term, -ratio * a
        return -clipped_term, 0.0  # the clipped term is constant in lp (ratio outside [lo, hi])
    if loss_fn == "cispo":
        weight = min(max(ratio, config["clip_low_threshold"]), config["clip_high_threshold"])
        return -weight * lp * a, -weight * a
    if loss_fn == "dro":
        beta = config["beta"]
        return -(lp * a - 0.5 * beta * (lp - q) ** 2), -(a - beta * (lp - q))
    raise AssertionError(loss_fn)


RL_CASES = [
    ("importance_sampling", {}),
    ("ppo", {}),
    ("ppo", {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05}),
    ("cispo", {}),
    ("cispo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.1}),
    ("dro", {"beta": 0.3}),
]


@pytest.mark.parametrize(("loss_fn", "config"), RL_CASES)
def test_rl_loss_matches_the_per_token_definition(loss_fn, config):
    rng = np.random.default_rng(3)
    lp = rng.uniform(-4, -0.01, 40)
    q = lp + rng.normal(0, 0.3, 40)  # ratios on both sides of every clip range
    advantages = rng.normal(0, 1, 40)
    weights = rng.uniform(0, 2, 40)
    resolved = SPECS[loss_fn].resolve_config(config)
    lp_t = torch.tensor(lp, requires_grad=True)
    inputs = {"target_tokens": torch.zeros(40, dtype=torch.long), "logprobs": torch.tensor(q),
              "advantages": torch.tensor(advantages), "weights": torch.tensor(weights)}
    result = LOSSES[loss_fn].fn(lp_t, inputs, resolved)
    result.loss.backward()
    per_token = [reference(loss_fn, *values, resolved) for values in zip(lp, q, advantages)]
    assert float(result.loss.detach()) == pytest.approx(sum(w * l for w, (l, _) in zip(weights, per_token)), rel=1e-9)
    assert np.allclose(lp_t.grad.numpy(), [w * g for w, (_, g) in zip(weights, per_token)], rtol=1e-9, atol=1e-12)
    assert np.array_equal(result.outputs["logprobs"].detach().numpy(), lp)
    if loss_fn == "ppo":  # the test data does reach the clipped branch
        assert any(g == 0.0 for _, g in per_token) and any(g != 0.0 for _, g in per_token)


def test_without_weights_every_token_counts_once():
    lp, q, a = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), torch.tensor([1.0, -2.0])
    inputs = {"target_tokens": torch.zeros(2, dtype=torch.long), "logprobs": q, "advantages": a}
    got = LOSSES["importance_sampling"].fn(lp, inputs, {})
    assert float(got.loss) == pytest.approx(-(math.exp(0.5) * 1.0 + math.exp(-1.0) * -2.0))


@pytest.mark.parametrize(("loss_fn", "config", "reason"), [
    ("ppo", {"clip_low_threshold": 1.3}, "BAD_LOSS_CONFIG"),  # low above the default high
    ("ppo", {"clip_low_threshold": -0.1}, "BAD_LOSS_CONFIG"),
    ("cispo", {"clip_high_threshold": float("nan")}, "NON_FINITE_INPUT"),
    ("dro", {"beta": -1.0}, "BAD_LOSS_CONFIG"),
    ("dro", {"beta": "big"}, "BAD_LOSS_CONFIG"),
    ("importance_sampling", {"beta": 0.1}, "UNKNOWN_LOSS_CONFIG"),
    ("cross_entropy", {"clip_low_threshold": 0.1}, "UNKNOWN_LOSS_CONFIG"),
])
def test_bad_configs_are_refused_with_a_reason(loss_fn, config, reason):
    with pytest.raises(InvalidArgumentError) as caught:
        SPECS[loss_fn].resolve_config(config)
    assert caught.value.reason == reason


def test_defaults_fill_in():
    assert SPECS["ppo"].resolve_config({}) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert SPECS["cispo"].resolve_config({"clip_high_threshold": 2}) == {"clip_low_threshold": 0.0,
                                                                          "clip_high_threshold": 2.0}
    assert SPECS["dro"].resolve_config({}) == {"beta": 0.05}


# ---- five tenants, five losses, one fused batch, against PEFT per adapter -----------------

FUSED = [  # adapter, loss, config, LoRA spec, datum lengths
    ("ce", "cross_entropy", {}, LoraSpec(rank=4, alpha=8, seed=1), [6, 9]),
    ("is", "importance_sampling", {}, LoraSpec(rank=8, alpha=8, train_mlp=False, seed=2), [11]),
    ("ppo", "ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, LoraSpec(rank=2, alpha=4, seed=3), [7, 13]),
    ("cispo", "cispo", {"clip_high_threshold": 1.2}, LoraSpec(rank=4, alpha=4, train_unembed=False, seed=4), [10]),
    ("dro", "dro", {"beta": 0.2}, LoraSpec(rank=4, alpha=16, train_attn=False, seed=5), [5, 8]),
]


def _reference_item_loss(peft, loss_fn: str, config: dict, data: list[DatumArrays]) -> torch.Tensor:
    """Per datum alone, unpadded; per token with the scalar definition (as a torch graph)."""
    total = torch.zeros((), dtype=torch.float64)
    for datum in data:
        logits = peft(input_ids=torch.as_tensor(datum.tokens)[None]).logits[0]
        targets = torch.as_tensor(datum.loss_inputs["target_tokens"])
        lp = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
        for t in range(len(targets)):
            if loss_fn == "cross_entropy":
                total = total - float(datum.loss_inputs["weights"][t]) * lp[t]
                continue
            q, a = float(datum.loss_inputs["logprobs"][t]), float(datum.loss_inputs["advantages"][t])
            value, slope = reference(loss_fn, float(lp[t]), q, a, config)
            # a first-order surrogate with the reference's value and gradient at lp[t]
            total = total + value + slope * (lp[t] - lp[t].detach())
    return total


def test_fused_batch_of_five_losses_matches_peft_per_adapter(tiny_dense_dir):
    engine = build_torch_engine(tiny_dense_dir, "tiny", "dense", max_lora_rank=32, max_seq_len=64)
    rng, gen = np.random.default_rng(11), torch.Generator().manual_seed(11)
    items, pefts = [], {}
    for adapter_id, loss_fn, config, spec, lengths in FUSED:
        engine.create_adapter(adapter_id, spec)
        randomize_b(engine, adapter_id, gen)
        weights = {n: t.clone() for n, t in engine.adapter(adapter_id).weights().items()}
        pefts[adapter_id] = peft_model(tiny_dense_dir, spec, engine.target_modules(spec), weights)
        data = []
        for n in lengths:
            tokens, targets = rng.integers(0, 256, n), rng.integers(0, 256, n)
            with torch.no_grad():
                logits = pefts[adapter_id](input_ids=torch.as_tensor(tokens)[None]).logits[0]
                lp = torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(targets)[:, None])[:, 0].numpy()
            inputs = {"target_tokens": targets, "weights": rng.uniform(-0.5, 1.5, n).astype(np.float32)}
            if loss_fn != "cross_entropy":  # sampler logprobs near the learner's: ratios around the clip range
                inputs = {"target_tokens": targets, "logprobs": (lp + rng.normal(0, 0.2, n)).astype(np.float32),
                          "advantages": rng.normal(0, 1, n).astype(np.float32)}
            data.append(DatumArrays(tokens=tokens, loss_inputs=inputs))
        items.append(EngineItem(f"item-{adapter_id}", adapter_id, ItemKind.FORWARD_BACKWARD, data,
                                loss_fn=loss_fn, loss_config=config))

    outcomes = engine.run_batch(items)

    for (adapter_id, loss_fn, config, spec, _), item, outcome in zip(FUSED, items, outcomes):
        assert outcome.failure is None, adapter_id
        resolved = SPECS[loss_fn].resolve_config(config)
        loss = _reference_item_loss(pefts[adapter_id], loss_fn, resolved, item.data)
        assert outcome.metrics["loss:sum"] == pytest.approx(float(loss), rel=1e-5, abs=1e-6), adapter_id
        loss.backward()
        params = peft_named_params(pefts[adapter_id], engine.target_modules(spec))
        grads = engine.adapter(adapter_id).accumulated_grads()
        assert set(grads) == set(params)
        for name, param in params.items():
            assert float(param.grad.abs().max()) > 0, (adapter_id, name)
            assert rel(grads[name], param.grad) <= 1e-5, (adapter_id, name)
