"""Custom losses computed on the client: the linear surrogate sent back as weights.

For any loss L(lp) of the learner's target logprobs, the cross_entropy loss
-sum(w * lp) with w = -dL/dlp (taken at the current weights) has the same gradient with
respect to the adapter's weights as L. So a loss of any form (DPO, a sequence-level
objective, ...) trains through the service's cross_entropy without running user code
on the service. Needs torch on the client.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tunemesh.types import Datum, ForwardBackwardOutput, TensorData

CustomLossFn = Callable[[list[Datum], list[Any]], tuple[Any, Mapping[str, float]]]
"""`loss_fn(data, logprobs) -> (loss, metrics)`: logprobs[i] is a float32 torch tensor
shaped like data[i]'s target_tokens; loss is a scalar torch tensor."""


def probe_data(data: Sequence[Datum]) -> list[Datum]:
    """The datums as sent for the logprobs: model input and target tokens only."""
    return [Datum(model_input=d.model_input, loss_fn_inputs={"target_tokens": _targets(d)}) for d in data]


def surrogate_data(data: Sequence[Datum], weights: Sequence[np.ndarray]) -> list[Datum]:
    return [
        Datum(model_input=d.model_input,
              loss_fn_inputs={"target_tokens": _targets(d), "weights": TensorData.from_numpy(w)})
        for d, w in zip(data, weights)
    ]


def surrogate_weights(
    data: Sequence[Datum], forward: ForwardBackwardOutput, loss_fn: CustomLossFn
) -> tuple[list[np.ndarray], float, dict[str, float]]:
    """Run `loss_fn` on the forward's logprobs; return -dL/dlp per datum, L and its metrics."""
    import torch

    logprobs = [
        torch.tensor(out["logprobs"].to_numpy(), dtype=torch.float32)
        .reshape(_targets(d).shape).requires_grad_()
        for d, out in zip(data, forward.loss_fn_outputs)
    ]
    loss, metrics = loss_fn(list(data), logprobs)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn must return a scalar torch tensor, got {type(loss).__name__}")
    value = float(loss.detach())
    if not np.isfinite(value):
        raise ValueError(f"the custom loss is {value}; nothing was sent")
    loss.backward()
    weights = [
        (-lp.grad if lp.grad is not None else torch.zeros_like(lp)).detach().numpy().astype(np.float32)
        for lp in logprobs
    ]
    return weights, value, {str(k): float(v) for k, v in dict(metrics or {}).items()}


def custom_output(
    surrogate: ForwardBackwardOutput, loss: float, metrics: Mapping[str, float]
) -> ForwardBackwardOutput:
    """The forward_backward's result with the custom loss as `loss:sum`."""
    merged = dict(surrogate.metrics)
    merged["surrogate_loss:sum"] = merged.pop("loss:sum", 0.0)
    merged["loss:sum"] = loss
    merged.update(metrics)
    return ForwardBackwardOutput(surrogate.loss_fn_outputs, merged, surrogate.loss_fn_output_type)


def _targets(datum: Datum) -> TensorData:
    targets = datum.loss_fn_inputs.get("target_tokens")
    if targets is None:
        raise ValueError("every datum needs loss_fn_inputs['target_tokens']")
    return targets
