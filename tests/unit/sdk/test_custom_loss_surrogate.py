"""The client-side half of forward_backward_custom: weights = -dloss/dlogprobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tunemesh
from tunemesh import custom_loss


def _data_and_forward(shapes):
    rng = np.random.default_rng(0)
    data, outputs = [], []
    for shape in shapes:
        n = shape[0]
        data.append(tunemesh.Datum(model_input=tunemesh.ModelInput.from_ints(list(range(1, n + 1))),
                                   loss_fn_inputs={"target_tokens": rng.integers(0, 9, shape), "chosen": [1.0] * n}))
        outputs.append({"logprobs": tunemesh.TensorData.from_numpy(rng.uniform(-3, 0, shape).astype(np.float32))})
    return data, tunemesh.ForwardBackwardOutput(outputs, {"loss:sum": 1.5})


def test_weights_are_minus_the_gradient_and_keep_the_targets_shape():
    data, forward = _data_and_forward([(4,), (3, 2)])

    def loss_fn(batch, logprobs):
        assert [tuple(lp.shape) for lp in logprobs] == [(4,), (3, 2)]
        return (logprobs[0] ** 2).sum() + 3 * logprobs[1].sum(), {"x:mean": 2}

    weights, value, metrics = custom_loss.surrogate_weights(data, forward, loss_fn)
    lp0 = forward.loss_fn_outputs[0]["logprobs"].to_numpy()
    assert np.allclose(weights[0], -2 * lp0)
    assert np.allclose(weights[1], -3 * np.ones((3, 2)))
    assert value == pytest.approx(float((lp0 ** 2).sum() + 3 * forward.loss_fn_outputs[1]["logprobs"].to_numpy().sum()))
    assert metrics == {"x:mean": 2.0}


def test_probe_and_surrogate_data_send_only_targets_and_weights():
    data, _ = _data_and_forward([(4,)])
    assert set(custom_loss.probe_data(data)[0].loss_fn_inputs) == {"target_tokens"}
    surrogate = custom_loss.surrogate_data(data, [np.ones(4, np.float32)])[0]
    assert set(surrogate.loss_fn_inputs) == {"target_tokens", "weights"}


def test_an_unused_logprob_gets_zero_weight():
    data, forward = _data_and_forward([(2,), (3,)])
    weights, _, _ = custom_loss.surrogate_weights(data, forward, lambda b, lps: (lps[0].sum(), {}))
    assert np.array_equal(weights[1], np.zeros(3, np.float32))


@pytest.mark.parametrize("bad", [lambda b, lps: (torch.stack([lp.sum() for lp in lps]), {}),
                                 lambda b, lps: (1.0, {}),
                                 lambda b, lps: (lps[0].sum() * float("nan"), {})])
def test_bad_losses_raise_before_anything_is_sent(bad):
    data, forward = _data_and_forward([(2,), (3,)])
    with pytest.raises((TypeError, ValueError)):
        custom_loss.surrogate_weights(data, forward, bad)


def test_custom_output_swaps_in_the_custom_loss():
    surrogate = tunemesh.ForwardBackwardOutput([], {"loss:sum": 0.25, "num_tokens:sum": 7.0})
    out = custom_loss.custom_output(surrogate, 3.0, {"acc:mean": 0.5})
    assert out.metrics == {"loss:sum": 3.0, "surrogate_loss:sum": 0.25, "num_tokens:sum": 7.0, "acc:mean": 0.5}
