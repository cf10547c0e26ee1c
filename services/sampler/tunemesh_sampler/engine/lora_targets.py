"""A model's LoRA targets in the sampler: wrapped linears and fused MoE experts, and which
adapter has factors on which of them."""

from __future__ import annotations

import torch
from torch import nn

from tunemesh_common import peft_format
from tunemesh.errors import InvalidArgumentError
from tunemesh_common.multi_lora import (
    LoraPair,
    LoraRouting,
    MultiLoraExperts,
    MultiLoraLinear,
    candidate_targets,
    expert_targets,
    full_shape,
    install_expert_wrappers,
    install_wrappers,
)


class LoraTargets:
    """Installs the multi-LoRA wrappers on `model` (sharing `routing`) and files each
    adapter's factors under them: linears by module name, fused expert weights as
    `<experts>.gate_up_proj` / `<experts>.down_proj` (PEFT's `target_parameters` layout)."""

    def __init__(self, model: nn.Module, routing: LoraRouting) -> None:
        self.linears: dict[str, MultiLoraLinear] = install_wrappers(model, sorted(candidate_targets(model)), routing)
        self.experts: dict[str, MultiLoraExperts] = install_expert_wrappers(model, expert_targets(model), routing)
        self._modules: dict[str, list[str]] = {}  # adapter key -> the modules it has LoRA on

    def __contains__(self, adapter_key: str) -> bool:
        return adapter_key in self._modules

    def pair(self, module: str, a: torch.Tensor, b: torch.Tensor, config: peft_format.AdapterConfig,
             device: torch.device) -> LoraPair:
        """`config`'s factors on `module`, checked against the target (InvalidArgumentError when
        they do not fit: A (rank [* experts], in), B (out, rank [* experts]))."""
        if module in self.linears:
            base = self.linears[module].base
            experts, in_f, out_f = 1, base.in_features, base.out_features
        elif peft_format.is_expert(module) and module.rpartition(".")[0] in self.experts:
            layer_name, _, param = module.rpartition(".")
            layer = self.experts[layer_name]
            experts, out_f, in_f = full_shape(getattr(layer.base, param))
        else:
            raise InvalidArgumentError("UNSUPPORTED_TARGET_MODULE", f"{module!r} is not a LoRA target of this model")
        rows = config.rank * experts
        if tuple(a.shape) != (rows, in_f) or tuple(b.shape) != (out_f, rows):
            what = f"a {in_f} -> {out_f} linear" if module in self.linears else f"{experts} experts' {in_f} -> {out_f}"
            raise InvalidArgumentError(
                "BAD_ADAPTER_WEIGHTS", f"{module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit {what}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise InvalidArgumentError("BAD_ADAPTER_WEIGHTS", f"{module}: LoRA factors are not finite")
        return LoraPair(_frozen(a, device), _frozen(b, device), config.alpha / config.rank, experts)

    def attach(self, adapter_key: str, pairs: dict[str, LoraPair]) -> None:
        """Serve `pairs` (module -> factors, from `pair`) under `adapter_key`."""
        for module, pair in pairs.items():
            self._table(module)[adapter_key] = pair
        self._modules[adapter_key] = sorted(pairs)

    def detach(self, adapter_key: str) -> bool:
        """Drop an adapter's factors; False when it has none here."""
        modules = self._modules.pop(adapter_key, None)
        for module in modules or ():
            del self._table(module)[adapter_key]
        return modules is not None

    def _table(self, module: str) -> dict[str, LoraPair]:
        if module in self.linears:
            return self.linears[module].pairs
        layer_name, _, param = module.rpartition(".")
        return self.experts[layer_name].pairs[param]


def _frozen(tensor: torch.Tensor, device: torch.device) -> nn.Parameter:
    return nn.Parameter(tensor.to(device), requires_grad=False)
