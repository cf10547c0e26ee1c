"""A model's LoRA targets in the sampler: the frozen base's wrapped linears and fused MoE
experts, and which adapter has factors on which of them."""

from __future__ import annotations

import torch
from torch import nn

from tunemesh_common.lora import peft_format
from tunemesh.errors import InvalidArgumentError
from tunemesh_common.lora.frozen_base import FrozenBase
from tunemesh_common.lora.multi_lora import LoraPair, MultiLoraExperts, MultiLoraLinear


class LoraTargets:
    """Files each adapter's factors under the wrappers of a frozen base (see frozen_base.py):
    linears by module name, fused expert weights as `<experts>.gate_up_proj` /
    `<experts>.down_proj` (PEFT's `target_parameters` layout)."""

    def __init__(self, base: FrozenBase) -> None:
        self._base = base
        self.linears: dict[str, MultiLoraLinear] = base.linears
        self.experts: dict[str, MultiLoraExperts] = base.experts
        self._modules: dict[str, list[str]] = {}  # adapter key -> the modules it has LoRA on

    def __contains__(self, adapter_key: str) -> bool:
        return adapter_key in self._modules

    def pair(self, module: str, a: torch.Tensor, b: torch.Tensor, config: peft_format.AdapterConfig,
             device: torch.device) -> LoraPair:
        """`config`'s factors on `module`, checked against the target (InvalidArgumentError when
        they do not fit: A (rank [* experts], in), B (out, rank [* experts]))."""
        if module not in self._base.groups:
            raise InvalidArgumentError("UNSUPPORTED_TARGET_MODULE", f"{module!r} is not a LoRA target of this model")
        in_f, out_f, experts = self._base.target_shape(module)
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
            self._base.pair_table(module)[adapter_key] = pair
        self._modules[adapter_key] = sorted(pairs)

    def detach(self, adapter_key: str) -> bool:
        """Drop an adapter's factors; False when it has none here."""
        modules = self._modules.pop(adapter_key, None)
        for module in modules or ():
            del self._base.pair_table(module)[adapter_key]
        return modules is not None


def _frozen(tensor: torch.Tensor, device: torch.device) -> nn.Parameter:
    return nn.Parameter(tensor.to(device), requires_grad=False)
