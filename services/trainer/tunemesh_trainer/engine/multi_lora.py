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

    `adapter_ids` lists the batch's distinct adapters; `row_slot[i]` indexes it for row i.
    Adapters outside `trainable` are used detached (no graph, no gradient).
    """

    adapter_ids: tuple[str, ...]
    row_slot: torch.Tensor  # int64 (rows,)
    trainable: frozenset[str]

    @property
    def num_rows(self) -> int:
        return int(self.row_slot.shape[0])


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
        if plan is None:
            return out
        gathered = self._gather(plan, x)
        if gathered is None:
            return out
        a_rows, b_rows, scale_rows = gathered
        x_rtd = x.reshape(plan.num_rows, -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(x_rtd, a_rows.transpose(1, 2)), b_rows.transpose(1, 2))
        return out + (delta * scale_rows).reshape(out.shape)

    def _gather(
        self, plan: RowPlan, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Per-row A (rows, r, in), B (rows, out, r), scale (rows, 1, 1); ranks zero-padded."""
        pairs = [self.pairs.get(aid) for aid in plan.adapter_ids]
        ranks = [p.rank for p in pairs if p is not None]
        if not ranks:
            return None
        r_max = max(ranks)
        in_f, out_f = self.base.in_features, self.base.out_features
        a_list, b_list, scales = [], [], []
        for aid, pair in zip(plan.adapter_ids, pairs):
            if pair is None:
                a_list.append(x.new_zeros(r_max, in_f))
                b_list.append(x.new_zeros(out_f, r_max))
                scales.append(0.0)
                continue
            a, b = (pair.a, pair.b) if aid in plan.trainable else (pair.a.detach(), pair.b.detach())
            a_list.append(F.pad(a, (0, 0, 0, r_max - pair.rank)))
            b_list.append(F.pad(b, (0, r_max - pair.rank)))
            scales.append(pair.scale)
        slots = plan.row_slot
        scale_rows = torch.tensor(scales, dtype=x.dtype, device=x.device)[slots]
        return (
            torch.stack(a_list).index_select(0, slots),
            torch.stack(b_list).index_select(0, slots),
            scale_rows.view(-1, 1, 1),
        )


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
