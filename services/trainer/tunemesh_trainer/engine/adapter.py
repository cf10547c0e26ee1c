"""One adapter slot: LoRA factors per target linear, accumulated gradients, optimizer."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from torch import nn

from tunemesh.errors import FailedPreconditionError, InvalidArgumentError
from tunemesh_trainer.domain import AdamSpec, AdapterState, LoraSpec
from tunemesh_common.lora.multi_lora import LoraPair
from tunemesh_trainer.engine.optimizer import AdapterOptimizer


def module_seed(seed: int, module_name: str) -> int:
    """A deterministic generator seed per (adapter seed, module)."""
    digest = hashlib.sha256(f"{seed}/{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class AdapterSlot:
    """Weights, gradients and optimizer state of one adapter, in sorted module order."""

    def __init__(self, spec: LoraSpec, shapes: dict[str, tuple[int, ...]], device: torch.device):
        """`shapes`: module -> (in, out[, experts]), experts 1 (or absent) for a linear;
        fused experts' factors take PEFT's `target_parameters` layout (see LoraPair)."""
        self.spec = spec
        alpha = spec.alpha if spec.alpha else float(spec.rank)
        self.pairs: dict[str, LoraPair] = {}
        for name in sorted(shapes):
            in_f, out_f, experts = (*shapes[name], 1)[:3]
            a = torch.empty(spec.rank * experts, in_f, device=device)
            gen = torch.Generator(device=device).manual_seed(module_seed(spec.seed, name))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
            b = torch.zeros(out_f, spec.rank * experts, device=device)
            self.pairs[name] = LoraPair(nn.Parameter(a), nn.Parameter(b), alpha / spec.rank, experts)
        self.params = [p for pair in self.pairs.values() for p in (pair.a, pair.b)]
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.optimizer = AdapterOptimizer(self.params)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def fresh_grads_finite(self) -> bool:
        """Whether the gradients of the last backward (in `.grad`) are all finite."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return True
        # inf/NaN anywhere shows in a tensor's 2-norm, which torch computes 15x faster than the
        # max norm on CPU (0.7 vs 10 ms for SmolLM2's 422 factors); a 2-norm can also overflow
        # on huge finite values, so only the max norm may call a gradient not finite
        if bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
            return True
        return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads, ord=math.inf))).all())

    def absorb_fresh_grads(self) -> None:
        """Add the last backward's gradients into the accumulated ones, then clear them."""
        pairs = [(acc, p.grad) for p, acc in zip(self.params, self.grads) if p.grad is not None]
        if pairs:
            with torch.no_grad():
                torch._foreach_add_([acc for acc, _ in pairs], [g for _, g in pairs])
        self.drop_fresh_grads()

    def drop_fresh_grads(self) -> None:
        for param in self.params:
            param.grad = None

    def optim_step(self, adam: AdamSpec) -> dict[str, float]:
        try:
            return self.optimizer.step(self.grads, adam)
        finally:
            for acc in self.grads:
                acc.zero_()

    def weights(self) -> dict[str, torch.Tensor]:
        """PEFT-style names (`<module>.lora_A.weight`) -> detached tensors."""
        return _named(self.pairs, [p.detach() for p in self.params])

    def accumulated_grads(self) -> dict[str, torch.Tensor]:
        return _named(self.pairs, self.grads)

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Overwrite LoRA factors from PEFT-style names; shapes must match exactly."""
        own = self.weights()
        if set(tensors) != set(own):
            raise InvalidArgumentError("BAD_ADAPTER_WEIGHTS", "weight names differ from the adapter's")
        with torch.no_grad():
            for name, target in own.items():
                if tuple(tensors[name].shape) != tuple(target.shape):
                    raise InvalidArgumentError("BAD_ADAPTER_WEIGHTS", f"{name}: shape mismatch")
                target.copy_(tensors[name])

    def export_state(self, with_optimizer: bool) -> AdapterState:
        """Copies of the weights (and optimizer state) as float32 arrays."""
        weights = {n: t.cpu().numpy().copy() for n, t in self.weights().items()}
        optimizer = self.optimizer.export_state(list(weights)) if with_optimizer else None
        return AdapterState(self.spec, weights, optimizer, self.optimizer.steps if with_optimizer else 0)

    def import_state(self, state: AdapterState) -> int:
        """Overwrite from `state` (see TrainingEngine.import_adapter); returns the step count."""
        if (state.spec.rank, state.spec.alpha) != (self.spec.rank, self.spec.alpha):
            raise FailedPreconditionError(
                "LORA_CONFIG_MISMATCH",
                f"checkpoint has rank {state.spec.rank} / alpha {state.spec.alpha:g}, the run "
                f"{self.spec.rank} / {self.spec.alpha:g}",
            )
        own = self.weights()
        tensors = _complete(state.weights, own)
        names = list(own)
        if state.optimizer is not None:
            _check_optimizer(state.optimizer, names)
        with torch.no_grad():
            for name, target in own.items():
                target.copy_(torch.from_numpy(tensors[name]))
        self.drop_fresh_grads()
        for acc in self.grads:
            acc.zero_()
        if state.optimizer is None:
            self.optimizer.reset()
        else:
            self.optimizer.import_state(names, state.optimizer, state.steps)
        return self.optimizer.steps

    def digest(self) -> str:
        hasher = hashlib.sha256(repr(self.spec).encode())
        hasher.update(str(self.optimizer.steps).encode())
        for tensor in [*self.params, *self.grads, *self.optimizer.state_tensors()]:
            hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return hasher.hexdigest()


def _named(pairs: dict[str, LoraPair], tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    names = [f"{m}.lora_{ab}.weight" for m in pairs for ab in ("A", "B")]
    return dict(zip(names, tensors))


def _complete(weights: dict[str, np.ndarray], own: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """`weights` checked against the slot's, plus zero A and B for modules it lacks."""
    unknown = sorted(set(weights) - set(own))
    if unknown:
        raise FailedPreconditionError(
            "LORA_CONFIG_MISMATCH", f"the run has no LoRA on {unknown[0].rsplit('.lora_', 1)[0]} ({len(unknown)} such tensors)"
        )
    out = {}
    for name, target in own.items():
        value = weights.get(name)
        if value is None:
            out[name] = np.zeros(tuple(target.shape), dtype=np.float32)
            continue
        if tuple(value.shape) != tuple(target.shape):
            raise InvalidArgumentError("BAD_ADAPTER_WEIGHTS", f"{name}: shape {list(value.shape)}, the run has {list(target.shape)}")
        if not np.isfinite(value).all():
            raise InvalidArgumentError("BAD_ADAPTER_WEIGHTS", f"{name}: not finite")
        value = np.asarray(value, dtype=np.float32)
        out[name] = value if value.flags.writeable else value.copy()  # torch wants writable memory
    modules_missing_half = {n.rsplit(".lora_", 1)[0] for n in own if n not in weights} & {
        n.rsplit(".lora_", 1)[0] for n in weights
    }
    if modules_missing_half:
        raise InvalidArgumentError("BAD_ADAPTER_WEIGHTS", f"{sorted(modules_missing_half)[0]}: needs both lora_A and lora_B")
    return out


def _check_optimizer(arrays: dict[str, np.ndarray], names: list[str]) -> None:
    known = set(names)
    for key, value in arrays.items():
        name, _, field = key.partition("/")
        if name not in known or field not in ("exp_avg", "exp_avg_sq", "step"):
            raise InvalidArgumentError("BAD_OPTIMIZER_STATE", f"unexpected optimizer tensor {key[:200]!r}")
        if not np.isfinite(value).all():
            raise InvalidArgumentError("BAD_OPTIMIZER_STATE", f"{key}: not finite")
