"""gspo (Tinker's GSPO-token loss) against a per-sequence reference written plainly.

The reference takes one datum as Python floats: its sequence ratio s is exp of the mean
of lp - q over the tokens `sequence_ratio_mask` marks (non-zero); every token's term is
ppo's min(s * A, clamp(s, lo, hi) * A), and its derivative in its own lp is s * A where
the unclipped term is the smaller and 0 where the clipped one is (s is held fixed: the
GSPO-token stop-gradient). It shares no code with the trainer's vectorised loss. Then on
tiny-dense, a fused batch with a gspo tenant is checked against HF PEFT on that adapter
alone, and two DeepSpeed ZeRO-3 CPU ranks against one process (the same `LOSSES`).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from peft_reference import peft_model, peft_named_params, randomize_b, rel
from tunemesh.errors import InvalidArgumentError
from tunemesh_common.training import datum_rules
from tunemesh_common.training.loss_specs import SPECS, spec_of
from tunemesh_trainer.domain import AdamSpec, DatumArrays, EngineItem, ItemKind, LoraSpec
from tunemesh_trainer.engine import build_torch_engine
from tunemesh_trainer.engine.losses import LOSSES

FB = ItemKind.FORWARD_BACKWARD


def reference(lp, q, a, w, mask, config) -> tuple[float, list[float]]:
    """One datum's loss and d loss / d lp per token, from the definition."""
    marked = [lp_t - q_t for lp_t, q_t, m in zip(lp, q, mask) if m != 0]
    s = math.exp(sum(marked) / len(marked))
    clipped = min(max(s, config["clip_low_threshold"]), config["clip_high_threshold"])
    loss, grads = 0.0, []
    for a_t, w_t in zip(a, w):
        if s * a_t <= clipped * a_t:  # min picks the unclipped term: its own lp's gradient flows
            loss -= w_t * s * a_t
            grads.append(-w_t * s * a_t)
        else:  # the clipped term is constant (s outside [lo, hi])
            loss -= w_t * clipped * a_t
            grads.append(0.0)
    return loss, grads


def _datum(rng: np.random.Generator, prompt: int, sampled: int, log_ratio: float):
    """A prompt (mask 0, sampler logprob unknown: garbage) then sampled tokens whose
    log-ratios lp - q scatter around `log_ratio`."""
    n = prompt + sampled
    lp = rng.uniform(-4, -0.01, n)
    q = lp - (log_ratio + rng.normal(0, 0.4, n))
    q[:prompt] = rng.uniform(-50, 50, prompt)
    mask = np.r_[np.zeros(prompt), rng.choice([1.0, 0.5, 3.0], sampled)]  # any non-zero marks
    return lp, q, rng.normal(0, 1, n), rng.uniform(0, 2, n), mask


def _run(lp, q, a, w, mask, config, loss_fn="gspo"):
    lp_t = torch.tensor(lp, requires_grad=True)
    inputs = {"target_tokens": torch.zeros(len(lp), dtype=torch.long), "logprobs": torch.tensor(q),
              "advantages": torch.tensor(a), "weights": torch.tensor(w)}
    if loss_fn == "gspo":
        inputs["sequence_ratio_mask"] = torch.tensor(mask)
    result = LOSSES[loss_fn].fn(lp_t, inputs, SPECS[loss_fn].resolve_config(config))
    result.loss.backward()
    return result, lp_t.grad.numpy()


@pytest.mark.parametrize("config", [{}, {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}])
def test_gspo_matches_the_per_sequence_definition(config):
    rng = np.random.default_rng(5)
    resolved = SPECS["gspo"].resolve_config(config)
    ratios = []
    for log_ratio in (-0.6, -0.02, 0.0, 0.03, 0.5, 1.0):  # sequence ratios below, inside and above
        lp, q, a, w, mask = _datum(rng, prompt=5, sampled=15, log_ratio=log_ratio)
        result, grad = _run(lp, q, a, w, mask, config)
        want_loss, want_grad = reference(lp, q, a, w, mask, resolved)
        assert float(result.loss.detach()) == pytest.approx(want_loss, rel=1e-9, abs=1e-12)
        assert np.allclose(grad, want_grad, rtol=1e-9, atol=1e-12)
        assert np.array_equal(result.outputs["logprobs"].detach().numpy(), lp)
        ratios.append(math.exp(np.mean((lp - q)[mask != 0])))
    lo, hi = resolved["clip_low_threshold"], resolved["clip_high_threshold"]
    assert min(ratios) < lo and max(ratios) > hi and any(lo < r < hi for r in ratios)  # every branch is run


def test_unmarked_tokens_do_not_enter_the_sequence_ratio():
    rng = np.random.default_rng(6)
    lp, q, a, w, mask = _datum(rng, prompt=6, sampled=10, log_ratio=0.1)
    base, base_grad = _run(lp, q, a, w, mask, {})
    moved = q.copy()
    moved[mask == 0] += 7.0
    same, same_grad = _run(lp, moved, a, w, mask, {})
    assert float(same.loss.detach()) == float(base.loss.detach()) and np.array_equal(same_grad, base_grad)
    moved[np.flatnonzero(mask)[0]] += 0.5  # a marked token moves s
    assert float(_run(lp, moved, a, w, mask, {})[0].loss.detach()) != pytest.approx(float(base.loss.detach()))


def test_one_clip_decision_per_sequence_unlike_ppo():
    """Token ratios e^0.5 and e^-0.5 (ppo clips each) around a sequence ratio of exactly 1:
    gspo keeps every token's gradient, A * w; ppo drops some."""
    n = 8
    lp = np.full(n, -1.0)
    q = lp - np.tile([0.5, -0.5], n // 2)
    a, w, mask = np.linspace(-1, 1, n), np.ones(n), np.ones(n)
    result, grad = _run(lp, q, a, w, mask, {})
    assert np.allclose(grad, -a, rtol=1e-12) and float(result.loss.detach()) == pytest.approx(-a.sum())
    _, ppo_grad = _run(lp, q, a, w, mask, {}, loss_fn="ppo")
    assert (ppo_grad == 0.0).sum() == n // 2


def test_no_marked_token_gives_a_non_finite_loss():
    rng = np.random.default_rng(7)
    lp, q, a, w, _ = _datum(rng, prompt=3, sampled=4, log_ratio=0.0)
    result, _ = _run(lp, q, a, w, np.zeros(len(lp)), {})
    assert math.isnan(float(result.loss.detach()))


# ---- catalogue: config and inputs ---------------------------------------------------------


def test_gspo_config_defaults_and_keys():
    assert SPECS["gspo"].resolve_config({}) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert SPECS["gspo"].resolve_config({"clip_low_threshold": 0.9997, "clip_high_threshold": 1.0004}) == {
        "clip_low_threshold": 0.9997, "clip_high_threshold": 1.0004}
    assert SPECS["gspo"].required_inputs == ("target_tokens", "logprobs", "advantages", "sequence_ratio_mask")
    assert SPECS["gspo"].optional_inputs == ("weights",)


@pytest.mark.parametrize(("config", "reason"), [
    ({"clip_low_threshold": 1.3}, "BAD_LOSS_CONFIG"),  # low above the default high
    ({"clip_low_threshold": -0.1}, "BAD_LOSS_CONFIG"),
    ({"clip_high_threshold": float("inf")}, "NON_FINITE_INPUT"),
    ({"clip_high_threshold": "1.2"}, "BAD_LOSS_CONFIG"),
    ({"beta": 0.05}, "UNKNOWN_LOSS_CONFIG"),
    ({"epsilon": 0.2}, "UNKNOWN_LOSS_CONFIG"),
])
def test_bad_gspo_configs_are_refused_with_a_reason(config, reason):
    with pytest.raises(InvalidArgumentError) as caught:
        SPECS["gspo"].resolve_config(config)
    assert caught.value.reason == reason


def test_stable_reinforce_is_not_in_the_catalogue():
    with pytest.raises(InvalidArgumentError) as caught:
        spec_of("stable_reinforce")
    assert caught.value.reason == "UNKNOWN_LOSS"
    assert "stable_reinforce" not in LOSSES


def test_scheduler_checks_a_gspo_request():
    from tunemesh.v1 import types_pb2
    from tunemesh_scheduler import validation

    number = types_pb2.LossConfigValue
    assert validation.check_loss("gspo", {"clip_high_threshold": number(number=1.1)}) == {
        "clip_low_threshold": 0.8, "clip_high_threshold": 1.1}
    with pytest.raises(InvalidArgumentError) as caught:
        validation.check_loss("gspo", {"beta": number(number=0.1)})
    assert caught.value.reason == "UNKNOWN_LOSS_CONFIG"


def _inputs(n: int, **overrides) -> dict[str, np.ndarray]:
    inputs = {"target_tokens": np.arange(n), "logprobs": np.full(n, -1.0, np.float32),
              "advantages": np.ones(n, np.float32), "sequence_ratio_mask": np.float32([0] + [1] * (n - 1))}
    inputs.update(overrides)
    return {k: v for k, v in inputs.items() if v is not None}


@pytest.mark.parametrize(("overrides", "loss_fn", "reason"), [
    ({"sequence_ratio_mask": None}, "gspo", "MISSING_LOSS_INPUT"),
    ({"sequence_ratio_mask": np.int64([0, 1, 1, 1])}, "gspo", "BAD_DTYPE"),
    ({"sequence_ratio_mask": np.float32([0, 1, 1])}, "gspo", "SHAPE_MISMATCH"),
    ({"sequence_ratio_mask": np.float32([0, 1, np.nan, 1])}, "gspo", "NON_FINITE_INPUT"),
    ({}, "ppo", "UNKNOWN_LOSS_INPUT"),  # the mask is gspo's alone
])
def test_gspo_datum_rules(overrides, loss_fn, reason):
    with pytest.raises(InvalidArgumentError) as caught:
        datum_rules.check_datum(np.arange(4), _inputs(4, **overrides), SPECS[loss_fn], vocab_size=16, max_seq_len=8)
    assert caught.value.reason == reason


def test_a_gspo_datum_with_weights_passes():
    inputs = _inputs(4, weights=np.float32([0, 1, 1, 0.5]))
    assert datum_rules.check_datum(np.arange(4), inputs, SPECS["gspo"], vocab_size=16, max_seq_len=8) == 4


# ---- tiny-dense: a fused batch against PEFT on the gspo adapter alone --------------------


def _base_model(model_dir):
    """The plain base model: a fresh adapter (B = 0) gives its logprobs."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _learner_logprobs(model, tokens, targets) -> torch.Tensor:
    logits = model(input_ids=torch.as_tensor(tokens)[None]).logits[0]
    return torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(targets)[:, None])[:, 0]


def _gspo_data(rng, model, shape: list[tuple[int, int, float]]) -> list[DatumArrays]:
    """Datums of (prompt, sampled, mean log-ratio), the sampler logprobs set from the
    learner's own so that the sequence ratios land where asked."""
    data = []
    for prompt, sampled, log_ratio in shape:
        n = prompt + sampled
        tokens, targets = rng.integers(0, 256, n), rng.integers(0, 256, n)
        with torch.no_grad():
            lp = _learner_logprobs(model, tokens, targets).numpy()
        q = lp - (log_ratio + rng.normal(0, 0.1, n))
        q[:prompt] = 0.0  # unknown on the prompt
        data.append(DatumArrays(tokens=tokens, loss_inputs={
            "target_tokens": targets, "logprobs": q.astype(np.float32),
            "advantages": rng.normal(0, 1, n).astype(np.float32),
            "weights": np.r_[np.zeros(prompt), rng.uniform(0.5, 1.5, sampled)].astype(np.float32),
            "sequence_ratio_mask": np.r_[np.zeros(prompt), np.ones(sampled)].astype(np.float32)}))
    return data


def _reference_loss(model, data: list[DatumArrays], config) -> torch.Tensor:
    """Per datum alone, unpadded: a first-order surrogate with the reference's value and gradients."""
    total = torch.zeros((), dtype=torch.float64)
    for datum in data:
        x = datum.loss_inputs
        lp = _learner_logprobs(model, datum.tokens, x["target_tokens"])
        value, slopes = reference(lp.detach().tolist(), x["logprobs"].tolist(), x["advantages"].tolist(),
                                  x["weights"].tolist(), x["sequence_ratio_mask"].tolist(), config)
        total = total + value + (torch.tensor(slopes) * (lp - lp.detach())).sum()
    return total


def test_fused_batch_with_gspo_matches_peft(tiny_dense_dir):
    engine = build_torch_engine(tiny_dense_dir, "tiny", "dense", max_lora_rank=32, max_seq_len=64)
    rng, gen = np.random.default_rng(21), torch.Generator().manual_seed(21)
    spec, config = LoraSpec(rank=4, alpha=8, seed=7), {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    engine.create_adapter("g", spec)
    randomize_b(engine, "g", gen)
    peft = peft_model(tiny_dense_dir, spec, engine.target_modules(spec),
                      {n: t.clone() for n, t in engine.adapter("g").weights().items()})
    data = _gspo_data(rng, peft, [(4, 9, 0.0), (3, 12, 0.4), (5, 6, -0.3)])  # inside, above, below
    engine.create_adapter("p", LoraSpec(rank=2, alpha=4, seed=8))
    other = [DatumArrays(tokens=rng.integers(0, 256, 7), loss_inputs={
        "target_tokens": rng.integers(0, 256, 7), "logprobs": np.full(7, -5.0, np.float32),
        "advantages": rng.normal(0, 1, 7).astype(np.float32)})]
    items = [EngineItem("item-p", "p", FB, other, loss_fn="ppo"),
             EngineItem("item-g", "g", FB, data, loss_fn="gspo", loss_config=config)]

    outcomes = engine.run_batch(items)

    assert [o.failure for o in outcomes] == [None, None]
    loss = _reference_loss(peft, data, SPECS["gspo"].resolve_config(config))
    assert outcomes[1].metrics["loss:sum"] == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-6)
    loss.backward()
    params = peft_named_params(peft, engine.target_modules(spec))
    grads = engine.adapter("g").accumulated_grads()
    assert set(grads) == set(params)
    for name, param in params.items():
        assert float(param.grad.abs().max()) > 0, name
        assert rel(grads[name], param.grad) <= 1e-5, name


def test_a_gspo_datum_with_no_marked_token_fails_its_item_alone(tiny_dense_dir):
    engine = build_torch_engine(tiny_dense_dir, "tiny", "dense", max_lora_rank=32, max_seq_len=64)
    rng = np.random.default_rng(22)
    engine.create_adapter("g", LoraSpec(rank=4, alpha=8, seed=9))
    engine.create_adapter("h", LoraSpec(rank=4, alpha=8, seed=10))
    base = _base_model(tiny_dense_dir)
    good, empty = _gspo_data(rng, base, [(2, 5, 0.0)]), _gspo_data(rng, base, [(2, 5, 0.0)])
    empty[0].loss_inputs["sequence_ratio_mask"][:] = 0.0
    outcomes = engine.run_batch([EngineItem("bad", "g", FB, good + empty, loss_fn="gspo"),
                                 EngineItem("ok", "h", FB, good, loss_fn="gspo")])
    assert outcomes[0].failure is not None and outcomes[0].failure.reason == "NON_FINITE_LOSS"
    assert outcomes[1].failure is None and math.isfinite(outcomes[1].metrics["loss:sum"])
    assert all(float(g.abs().max()) == 0 for g in engine.adapter("g").accumulated_grads().values())
    assert any(float(g.abs().max()) > 0 for g in engine.adapter("h").accumulated_grads().values())


# ---- DeepSpeed: two ZeRO-3 CPU ranks run gspo from the same catalogue --------------------


@pytest.mark.slow
def test_deepspeed_ranks_run_gspo_as_one_process(tiny_dense_dir):
    pytest.importorskip("deepspeed")
    from tunemesh_trainer.ranks import shared_local_group

    threads = torch.get_num_threads()
    try:
        group = shared_local_group(2, threads=1, timeout_s=120)
        kwargs = dict(name="tiny", family="dense", max_lora_rank=16, max_seq_len=48, max_batch_tokens=64)
        torch_engine = build_torch_engine(tiny_dense_dir, num_threads=1, **kwargs)
        ds_engine = group.build(model_dir=tiny_dense_dir, num_threads=1, **kwargs)
    finally:
        torch.set_num_threads(threads)
    spec = LoraSpec(rank=4, alpha=8, seed=11)
    for engine in (torch_engine, ds_engine):
        engine.create_adapter("g", spec)
    rng = np.random.default_rng(23)
    data = _gspo_data(rng, _base_model(tiny_dense_dir), [(3, 8, 0.0), (2, 14, 0.3), (4, 5, -0.2)])
    batch = [EngineItem("g1", "g", FB, data, loss_fn="gspo", loss_config={"clip_high_threshold": 1.1})]
    want, got = torch_engine.run_batch(batch)[0], ds_engine.run_batch(batch)[0]
    assert want.failure is None and got.failure is None
    assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=1e-5, abs=1e-6)
    adam = AdamSpec(learning_rate=1e-2, beta1=0.0, weight_decay=0.0)  # exp_avg after one step = the gradient
    grads = {n: t.clone() for n, t in torch_engine.adapter("g").accumulated_grads().items()}
    assert any(float(g.abs().max()) > 0 for g in grads.values())
    torch_engine.optim_step("g", adam)
    ds_engine.optim_step("g", adam)
    state = ds_engine.export_adapter("g", with_optimizer=True)
    for name, grad in grads.items():
        np.testing.assert_allclose(state.optimizer[f"{name}/exp_avg"], grad.numpy(), rtol=1e-5, atol=1e-6)
