"""One adapter's AdamW (torch.optim.AdamW semantics), hyper-parameters given per step."""

from __future__ import annotations

import numpy as np
import torch

from tunemesh.errors import InvalidArgumentError
from tunemesh_trainer.domain import AdamSpec


class AdapterOptimizer:
    """AdamW over one adapter's parameters, with optional global-norm clipping."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self._adamw = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        self.steps = 0

    def step(self, grads: list[torch.Tensor], adam: AdamSpec) -> dict[str, float]:
        """Apply one step with `grads` (one per parameter, modified in place when clipping)."""
        _check_spec(adam)
        grad_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        if not _finite(grad_norm):
            raise InvalidArgumentError("NON_FINITE_GRADIENT", "accumulated gradient norm is not finite")
        for param, grad in zip(self.params, grads):
            param.grad = grad
        try:
            if adam.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, adam.grad_clip_norm)
            for group in self._adamw.param_groups:
                group.update(
                    lr=adam.learning_rate,
                    betas=(adam.beta1, adam.beta2),
                    eps=adam.eps,
                    weight_decay=adam.weight_decay,
                )
            self._adamw.step()
        finally:
            for param in self.params:
                param.grad = None
        self.steps += 1
        return {"grad_norm:max": grad_norm, "step:max": float(self.steps)}

    def state_tensors(self) -> list[torch.Tensor]:
        """Every optimizer-state tensor, in a fixed order (for digests)."""
        tensors = []
        for param in self.params:
            state = self._adamw.state.get(param, {})
            tensors.extend(torch.as_tensor(state[key]) for key in sorted(state))
        return tensors

    def state_dict(self) -> dict:
        return self._adamw.state_dict()

    def export_state(self, names: list[str]) -> dict[str, np.ndarray]:
        """Per-parameter AdamW state as `<name>/<key>` -> array copies (params in order)."""
        out = {}
        for name, param in zip(names, self.params, strict=True):
            for key, value in self._adamw.state.get(param, {}).items():
                out[f"{name}/{key}"] = torch.as_tensor(value).detach().cpu().numpy().copy()
        return out

    def import_state(self, names: list[str], arrays: dict[str, np.ndarray], steps: int) -> None:
        """Restore what `export_state` produced (exact: same dtypes, same values)."""
        by_name: dict[str, dict[str, np.ndarray]] = {}
        for key, value in arrays.items():
            name, _, field = key.partition("/")
            by_name.setdefault(name, {})[field] = value
        self._adamw.state.clear()
        for name, param in zip(names, self.params, strict=True):
            if name in by_name:
                self._adamw.state[param] = {
                    k: torch.from_numpy(np.array(v, copy=True)).to(param.device) for k, v in by_name[name].items()
                }
        self.steps = steps

    def reset(self) -> None:
        """Forget all AdamW state: the next step is step 1."""
        self._adamw.state.clear()
        self.steps = 0


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def _check_spec(adam: AdamSpec) -> None:
    if not adam.learning_rate >= 0:
        raise InvalidArgumentError("BAD_ADAM_PARAMS", "learning_rate must be >= 0")
    if not (0 <= adam.beta1 < 1 and 0 <= adam.beta2 < 1):
        raise InvalidArgumentError("BAD_ADAM_PARAMS", "beta1 and beta2 must lie in [0, 1)")
    if not adam.eps >= 0 or not adam.weight_decay >= 0 or not adam.grad_clip_norm >= 0:
        raise InvalidArgumentError("BAD_ADAM_PARAMS", "eps, weight_decay and grad_clip_norm must be >= 0")
