"""Multi-adapter LoRA linears: each row of a fused batch uses its own adapter's A and B.

A `LoraRouting` object, shared by every wrapped linear of one model, carries the current
batch's row -> adapter plan; outside a batch the wrappers compute the base model alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class LoraPair:
    """One adapter's LoRA factors on one linear: delta(x) = scale * x @ A.T @ B.T."""

    a: nn.Parameter  # (rank, in_features)
    b: nn.Parameter  # (out_features, rank)
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """Which adapter each row of the current batch uses.

    Rows of one item are contiguous, so the plan is a list of segments
    `(adapter_id, first_row, end_row)`. Adapters outside `trainable` are used detached
    (no graph, no gradient).
    """

    segments: tuple[tuple[str, int, int], ...]
    trainable: frozenset[str]

    @property
    def num_rows(self) -> int:
        return self.segments[-1][2] if self.segments else 0


class LoraRouting:
    """Holds the plan of the batch now running; set it with `use`."""

    def __init__(self) -> None:
        self.plan: RowPlan | None = None

    @contextlib.contextmanager
    def use(self, plan: RowPlan) -> Iterator[None]:
        self.plan = plan
        try:
            yield
        finally:
            self.plan = None


class MultiLoraLinear(nn.Module):
    """A frozen base linear plus per-adapter LoRA factors, selected per row."""

    def __init__(self, base: nn.Linear, routing: LoraRouting) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.pairs: dict[str, LoraPair] = {}  # plain dict: adapter weights are not module state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        plan = self.routing.plan
        if plan is None or not any(aid in self.pairs for aid, _, _ in plan.segments):
            return out
        rows = plan.num_rows
        x_r = x.reshape(rows, -1, x.shape[-1])
        out_r = out.reshape(rows, -1, out.shape[-1])
        pieces = [self._segment(plan, aid, x_r[start:end], out_r[start:end]) for aid, start, end in plan.segments]
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).reshape(out.shape)

    def _segment(self, plan: RowPlan, adapter_id: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """base + scale * x @ A.T @ B.T for the rows of one adapter (PEFT's order of operations)."""
        pair = self.pairs.get(adapter_id)
        if pair is None:
            return out
        a, b = (pair.a, pair.b) if adapter_id in plan.trainable else (pair.a.detach(), pair.b.detach())
        return out + F.linear(F.linear(x, a), b) * pair.scale


def candidate_targets(model: nn.Module) -> dict[str, str]:
    """Linears LoRA may target, name -> group ("attn", "mlp", "unembed").

    Only dense MLP linears count as "mlp": fused 3-D MoE experts are not nn.Linear.
    """
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parent, _, leaf = name.rpartition(".")
        if leaf in ATTENTION_NAMES and parent.endswith(("self_attn", "attention", "attn")):
            found[name] = "attn"
        elif leaf in DENSE_MLP_NAMES and parent.endswith("mlp"):
            found[name] = "mlp"
    unembed = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is unembed and isinstance(module, nn.Linear):
            found[name] = "unembed"
    return found


def install_wrappers(
    model: nn.Module, names: list[str], routing: LoraRouting
) -> dict[str, MultiLoraLinear]:
    """Replace each named linear by a MultiLoraLinear sharing `routing`."""
    wrappers: dict[str, MultiLoraLinear] = {}
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = MultiLoraLinear(getattr(parent, leaf), routing)
        setattr(parent, leaf, wrapper)
        wrappers[name] = wrapper
    return wrappers
