"""One adapter slot: LoRA factors per target linear, accumulated gradients, optimizer."""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from tunemesh_common.errors import InvalidArgument
from tunemesh_trainer.domain import AdamSpec, LoraSpec
from tunemesh_trainer.engine.multi_lora import LoraPair
from tunemesh_trainer.engine.optimizer import AdapterOptimizer


def module_seed(seed: int, module_name: str) -> int:
    """A deterministic generator seed per (adapter seed, module)."""
    digest = hashlib.sha256(f"{seed}/{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class AdapterSlot:
    """Weights, gradients and optimizer state of one adapter, in sorted module order."""

    def __init__(self, spec: LoraSpec, shapes: dict[str, tuple[int, int]], device: torch.device):
        self.spec = spec
        alpha = spec.alpha if spec.alpha else float(spec.rank)
        self.pairs: dict[str, LoraPair] = {}
        for name in sorted(shapes):
            in_f, out_f = shapes[name]
            a = torch.empty(spec.rank, in_f, device=device)
            gen = torch.Generator(device=device).manual_seed(module_seed(spec.seed, name))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
            b = torch.zeros(out_f, spec.rank, device=device)
            self.pairs[name] = LoraPair(nn.Parameter(a), nn.Parameter(b), alpha / spec.rank)
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
        norms = torch._foreach_norm(grads, ord=math.inf)  # inf/NaN anywhere shows in the max norm
        return bool(torch.isfinite(torch.stack(norms)).all())

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
            raise InvalidArgument("BAD_ADAPTER_WEIGHTS", "weight names differ from the adapter's")
        with torch.no_grad():
            for name, target in own.items():
                if tuple(tensors[name].shape) != tuple(target.shape):
                    raise InvalidArgument("BAD_ADAPTER_WEIGHTS", f"{name}: shape mismatch")
                target.copy_(tensors[name])

    def digest(self) -> str:
        hasher = hashlib.sha256(repr(self.spec).encode())
        hasher.update(str(self.optimizer.steps).encode())
        for tensor in [*self.params, *self.grads, *self.optimizer.state_tensors()]:
            hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return hasher.hexdigest()


def _named(pairs: dict[str, LoraPair], tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    names = [f"{m}.lora_{ab}.weight" for m in pairs for ab in ("A", "B")]
    return dict(zip(names, tensors))
