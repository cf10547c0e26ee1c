"""cross_entropy against a numpy reference, for (N,) and (N, K) targets."""

from __future__ import annotations

import numpy as np
import torch

from tunemesh_trainer.engine.losses import LOSSES, cross_entropy, target_logprobs


def _np_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    rows = np.arange(len(targets)).reshape(-1, *([1] * (targets.ndim - 1)))
    return logp[rows, targets]


def _torch_logprobs(logits: np.ndarray, targets: np.ndarray) -> torch.Tensor:
    """The engine's batched gather, on one datum: (N,) or (N, K) like the targets."""
    index = torch.tensor(targets).reshape(1, len(targets), -1)
    return target_logprobs(torch.tensor(logits)[None], index)[0].reshape(targets.shape)


def test_cross_entropy_weighted_and_default_weights():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 11)).astype(np.float64)
    targets = rng.integers(0, 11, 6)
    weights = np.array([1.0, -2.0, 0.0, 0.5, 3.0, -0.25])
    lp = _np_logprobs(logits, targets)
    got = cross_entropy(_torch_logprobs(logits, targets), {"target_tokens": torch.tensor(targets), "weights": torch.tensor(weights)}, {})
    assert np.allclose(got.outputs["logprobs"].numpy(), lp)
    assert np.isclose(float(got.loss), -(weights * lp).sum())
    unweighted = cross_entropy(_torch_logprobs(logits, targets), {"target_tokens": torch.tensor(targets)}, {})
    assert np.isclose(float(unweighted.loss), -lp.sum())


def test_cross_entropy_multi_target():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 9))
    targets = rng.integers(0, 9, (4, 3))
    weights = rng.normal(size=(4, 3))
    got = cross_entropy(_torch_logprobs(logits, targets), {"target_tokens": torch.tensor(targets), "weights": torch.tensor(weights)}, {})
    lp = _np_logprobs(logits, targets)
    assert got.outputs["logprobs"].shape == (4, 3)
    assert np.allclose(got.outputs["logprobs"].numpy(), lp)
    assert np.isclose(float(got.loss), -(weights * lp).sum())


def test_loss_table_names_inputs():
    assert LOSSES["cross_entropy"].required_inputs == ("target_tokens",)
