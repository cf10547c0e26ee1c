"""forward_backward_custom through the in-process mesh: the linear surrogate's gradients
equal the built-in loss's (cross_entropy twin) and a direct torch computation (DPO)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tunemesh
from mesh_harness import FAST_RETRY
from peft_reference import peft_model, peft_named_params, rel
from tunemesh_common.models import TINY_DENSE
from tunemesh_trainer.domain import LoraSpec

LORA = dict(rank=4, seed=5)


@pytest.fixture
def service(mesh, tmp_path):
    with tunemesh.ServiceClient(mesh.address, "key-a", retry_policy=FAST_RETRY, tokenizer_cache_dir=tmp_path) as s:
        yield s


def _datum(rng, n: int) -> tunemesh.Datum:
    tokens = rng.integers(1, 1000, n + 1)
    weights = rng.uniform(-0.5, 1.5, n).astype(np.float32)
    return tunemesh.Datum(model_input=tunemesh.ModelInput.from_ints(tokens[:-1].tolist()),
                          loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights})


def _grads(mesh, run: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in mesh.engine.adapter(run).accumulated_grads().items()}


def test_a_custom_cross_entropy_gives_the_builtin_gradients(mesh, service):
    data = [_datum(np.random.default_rng(1), n) for n in (7, 12)]
    builtin = service.create_lora_training_client(TINY_DENSE, **LORA)
    custom = service.create_lora_training_client(TINY_DENSE, **LORA)

    def cross_entropy(batch, logprobs):
        loss = sum(-(torch.tensor(d.loss_fn_inputs["weights"].to_numpy()) * lp).sum() for d, lp in zip(batch, logprobs))
        return loss, {"datums:sum": float(len(batch))}

    want = builtin.forward_backward(data, "cross_entropy").result()
    got = custom.forward_backward_custom(data, cross_entropy).result()

    assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=1e-5)
    assert got.metrics["surrogate_loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=1e-5)
    assert got.metrics["datums:sum"] == 2.0
    expected, actual = _grads(mesh, builtin.run), _grads(mesh, custom.run)
    assert set(actual) == set(expected)
    for name in expected:
        assert float(expected[name].abs().max()) > 0 or "lora_A" in name
        assert rel(actual[name], expected[name]) <= 1e-5, name


def _dpo(beta: float, reference: list[float]):
    """DPO over (chosen, rejected) datum pairs: -logsigmoid(beta * (margin - reference margin))."""
    def loss_fn(batch, logprobs):
        sums = [lp.sum() for lp in logprobs]
        losses = [-torch.nn.functional.logsigmoid(beta * ((sums[i] - sums[i + 1]) - (reference[i] - reference[i + 1])))
                  for i in range(0, len(sums), 2)]
        return torch.stack(losses).sum(), {"pairs:sum": float(len(losses))}
    return loss_fn


def test_a_dpo_loss_matches_a_direct_torch_computation(mesh, service):
    rng = np.random.default_rng(2)
    data = [_datum(rng, n) for n in (6, 9, 8, 5)]  # two (chosen, rejected) pairs
    reference = [-3.0, -2.5, -1.0, -4.0]  # reference-model sums, fixed
    training = service.create_lora_training_client(TINY_DENSE, **LORA)
    spec = LoraSpec(rank=4, alpha=4, seed=5)
    weights = {k: v.clone() for k, v in mesh.engine.adapter(training.run).weights().items()}
    with torch.no_grad():  # B != 0 so every LoRA matrix gets a gradient
        for name in weights:
            if ".lora_B." in name:
                weights[name].normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    mesh.engine.adapter(training.run).load_weights(weights)

    got = training.forward_backward_custom(data, _dpo(0.5, reference)).result()

    peft = peft_model(mesh.model_dir, spec, mesh.engine.target_modules(spec), weights)
    sums = []
    for datum in data:
        tokens = torch.tensor(datum.model_input.to_ints())
        targets = torch.tensor(datum.loss_fn_inputs["target_tokens"].to_numpy())
        logits = peft(input_ids=tokens[None]).logits[0]
        sums.append(torch.log_softmax(logits, -1).gather(-1, targets[:, None]).sum())
    want, _ = _dpo(0.5, reference)(data, [s.reshape(1) for s in sums])
    want.backward()
    assert got.metrics["loss:sum"] == pytest.approx(float(want.detach()), rel=1e-5)
    actual = _grads(mesh, training.run)
    for name, param in peft_named_params(peft, mesh.engine.target_modules(spec)).items():
        assert float(param.grad.abs().max()) > 0, name
        assert rel(actual[name], param.grad) <= 1e-4, name


def test_a_failing_custom_loss_fails_its_call_only(mesh, service):
    training = service.create_lora_training_client(TINY_DENSE, **LORA)
    data = [_datum(np.random.default_rng(4), 5)]

    def broken(batch, logprobs):
        raise RuntimeError("bug in my loss")

    with pytest.raises(RuntimeError, match="bug in my loss"):
        training.forward_backward_custom(data, broken).result()
    assert training.forward_backward(data, "cross_entropy").result().metrics["loss:sum"] != 0  # the run goes on
    assert all(float(g.abs().max()) > 0 for n, g in _grads(mesh, training.run).items() if "lora_B" in n)


@pytest.mark.parametrize(("loss_fn", "inputs", "config", "reason"), [
    ("importance_sampling", {"advantages": [0.5, float("nan"), 1.0]}, None, "NON_FINITE_INPUT"),
    ("ppo", {}, {"clip_low_threshold": 1.5}, "BAD_LOSS_CONFIG"),
    ("dro", {"advantages": None}, None, "MISSING_LOSS_INPUT"),
    ("reinforce_plus_plus", {}, None, "UNKNOWN_LOSS"),
])
def test_bad_rl_requests_never_reach_the_trainer(mesh, service, loss_fn, inputs, config, reason):
    training = service.create_lora_training_client(TINY_DENSE, **LORA)
    clean = {"target_tokens": [5, 6, 7], "logprobs": [-1.0, -2.0, -0.5], "advantages": [1.0, -1.0, 0.5]}
    values = {**clean, **inputs}

    def datum(values):
        return tunemesh.Datum(model_input=tunemesh.ModelInput.from_ints([4, 5, 6]),
                              loss_fn_inputs={k: v for k, v in values.items() if v is not None})

    before = mesh.trainer.calls["RunBatch"]
    with pytest.raises(tunemesh.InvalidArgumentError) as caught:
        training.forward_backward([datum(values)], loss_fn, config).result()
    assert caught.value.reason == reason
    assert mesh.trainer.calls["RunBatch"] == before
    assert training.forward_backward([datum(clean)], "ppo").result().metrics["loss:sum"] != 0.0  # the run goes on
