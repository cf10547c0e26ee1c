"""A frozen HF causal LM ready for per-row multi-LoRA: the one loader of the trainer's and
the sampler's torch engines (and, through the trainer's, of every DeepSpeed rank).

`load_frozen_base` loads the weights in the base dtype, moves them to the device, freezes
them, and wraps every LoRA target (the attention / dense MLP / unembedding linears and the
supported fused MoE experts) so that each row of a batch adds its own adapter's delta.
Adapters' factors are filed under the wrappers by target name: a linear's module name, or
`<experts>.gate_up_proj` / `<experts>.down_proj` for fused expert weights (PEFT's
`target_parameters` layout).
"""

from __future__ import annotations

import dataclasses
import pathlib

import torch
from torch import nn

from tunemesh.errors import InvalidArgumentError
from tunemesh_common.lora.multi_lora import (
    EXPERT_PARAMETERS,
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

BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(eq=False)
class FrozenBase:
    """A loaded, frozen base model with its LoRA targets wrapped (see the module docstring)."""

    model: nn.Module
    routing: LoraRouting  # shared by every wrapper: the running batch's row -> adapter plan
    linears: dict[str, MultiLoraLinear]
    experts: dict[str, MultiLoraExperts]
    groups: dict[str, str]  # target name -> "attn" | "mlp" | "unembed" | "experts"
    has_fused_experts: bool  # 3-D expert weights exist, wrapped or not (an unsupported layout)

    @property
    def gemms_all_wrapped(self) -> bool:
        """Every matmul of the model's forward with more than one term per sum runs inside a
        LoRA wrapper (all linears wrapped, no MoE: a router's linear is not) or in
        tunemesh's attention: those pad their own GEMMs in batch-invariant mode, so the
        engine needs no model-wide BatchInvariantMode (~8 % of a decode step in dispatch)."""
        if self.experts or self.has_fused_experts:
            return False
        wrapped = {id(wrapper.base) for wrapper in self.linears.values()}
        return all(id(m) in wrapped for m in self.model.modules() if isinstance(m, nn.Linear))

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def pair_table(self, target: str) -> dict[str, LoraPair]:
        """The adapter id -> LoRA factors table of a target (KeyError if it is none)."""
        if target in self.linears:
            return self.linears[target].pairs
        layer, _, param = target.rpartition(".")
        return self.experts[layer].pairs[param]

    def target_shape(self, target: str) -> tuple[int, int, int]:
        """(in, out, experts) of a target: experts is 1 for a linear, else every expert of
        the layer (also where expert parallelism left this rank a share of them)."""
        if target in self.linears:
            base = self.linears[target].base
            return base.in_features, base.out_features, 1
        layer_name, _, param = target.rpartition(".")
        layer = self.experts[layer_name]
        _, out_f, in_f = full_shape(getattr(layer.base, param))
        return in_f, out_f, layer.num_experts


WEIGHT_ALIGNMENT = 64  # bytes: torch's own CPU allocations, a cache line


def _align_weights(model: nn.Module) -> None:
    """Give every CPU weight loaded at an unaligned address (safetensors places tensors at
    8-byte offsets in the file's buffer) memory of its own, aligned as torch allocates it.
    oneDNN read such a weight at half speed through its transposed view, the input
    gradients' GEMMs: SmolLM2's vocab head 67 against 118 GFLOP/s, its down_proj 72 against
    100, on this project's AVX2 hosts. A ZeRO-3 partition is DeepSpeed's to place."""
    for param in model.parameters():
        if param.device.type == "cpu" and not hasattr(param, "ds_id") and param.data_ptr() % WEIGHT_ALIGNMENT:
            param.data = param.data.clone()


def load_frozen_base(model_dir: pathlib.Path, dtype: str, device: torch.device) -> FrozenBase:
    """Load the model of a local HF directory with its weights in `dtype` (a BASE_DTYPES
    key) on `device`, frozen and in eval mode, its LoRA targets wrapped (one routing).

    Under an active DeepSpeed ZeRO-3 config (transformers' HfDeepSpeedConfig) the model is
    built partitioned: each rank materialises only its shard of every weight."""
    if dtype not in BASE_DTYPES:
        raise InvalidArgumentError("BAD_DTYPE", f"base dtype must be one of {sorted(BASE_DTYPES)}, got {dtype!r}")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=BASE_DTYPES[dtype])
    model.requires_grad_(False)
    model = model.eval().to(device)
    _align_weights(model)
    routing = LoraRouting()
    groups = candidate_targets(model)
    linears = install_wrappers(model, sorted(groups), routing)
    has_fused_experts = any(len(full_shape(p)) == 3 and ".experts." in n for n, p in model.named_parameters())
    experts = install_expert_wrappers(model, expert_targets(model), routing)
    groups.update({f"{m}.{p}": "experts" for m in experts for p in EXPERT_PARAMETERS})
    return FrozenBase(model, routing, linears, experts, groups, has_fused_experts)
