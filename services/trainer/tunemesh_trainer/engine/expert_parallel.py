"""Expert parallelism: the ranks of an expert-parallel group split every MoE layer's experts.

Each rank keeps the base weights of E / size experts only (as buffers, so ZeRO leaves
them alone) and every adapter's full expert LoRA factors. At each MoE layer the ranks
exchange their tokens (hidden states, routing weights, expert choices, adapter slots);
each rank runs its own experts over the tokens of the whole group, and the partial
outputs are summed back to the rank each token came from. Both exchanges are autograd
functions, so backward sums the gradients of the gathered tokens the same way.

The gradient of an expert's LoRA is complete on the rank that owns the expert and zero
elsewhere, so the data-parallel all-reduce of LoRA gradients yields the exact total.
Every rank must run every MoE layer of every pass together (the engine's pass count and
`walk_all` backward see to that), and the outputs are kept connected to the inputs so
that every rank's backward reaches every exchange.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from tunemesh.errors import InvalidArgumentError
from tunemesh_common.lora.multi_lora import EXPERT_PARAMETERS, MultiLoraExperts, RowPlan, token_adapter_slots


@dataclasses.dataclass(frozen=True)
class ExpertGroup:
    """This rank's expert-parallel group: `size` ranks, this one at `rank` within it."""

    group: Any  # a torch.distributed process group; None: the default group
    size: int
    rank: int


def form_groups(world: int, rank: int, size: int) -> ExpertGroup:
    """Cut the world into consecutive expert-parallel groups of `size` ranks (a collective:
    every rank calls it)."""
    if size < 1 or world % size:
        raise InvalidArgumentError("BAD_EXPERT_PARALLEL", f"expert-parallel size {size} must divide the {world} ranks")
    if size == 1:
        return ExpertGroup(None, 1, 0)
    if size == world:
        return ExpertGroup(None, size, rank)
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return ExpertGroup(mine, size, rank % size)


def shard_experts(layers: dict[str, MultiLoraExperts], ep: ExpertGroup) -> int:
    """Keep only this rank's experts' base weights in every layer and route the layers
    through a TokenExchange; returns the experts per rank."""
    exchange = TokenExchange(ep)
    per_rank = 0
    for name, layer in layers.items():
        if layer.num_experts % ep.size:
            raise InvalidArgumentError("BAD_EXPERT_PARALLEL",
                                  f"{name} has {layer.num_experts} experts, not divisible by {ep.size} ranks")
        per_rank = layer.num_experts // ep.size
        first = ep.rank * per_rank
        weights = [getattr(layer.base, param) for param in EXPERT_PARAMETERS]
        with _gathered(weights):  # loaded under zero.Init: every rank sees the whole tensors here
            local = [w.detach()[first : first + per_rank].clone() for w in weights]
        for param, weight in zip(EXPERT_PARAMETERS, local):
            delattr(layer.base, param)
            layer.base.register_buffer(param, weight)
        layer.local_experts = range(first, first + per_rank)
        layer.exchange = exchange
    return per_rank


def _gathered(weights: list[torch.Tensor]):
    """Gather ZeRO-3 partitioned weights for reading (a collective); no-op for plain tensors."""
    if not any(hasattr(w, "ds_id") for w in weights):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(weights)


class TokenExchange:
    """The forward of an expert-sharded MoE experts layer (see the module docstring)."""

    def __init__(self, ep: ExpertGroup) -> None:
        self._ep = ep

    def __call__(self, layer: MultiLoraExperts, plan: RowPlan | None, hidden_nh: torch.Tensor,
                 top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        ep, n = self._ep, hidden_nh.shape[0]
        adapters = layer.adapter_ids()  # the same on every rank: adapters are created on all
        slots = [(None, False)] + [(aid, trains) for aid in adapters for trains in (False, True)]
        token_slot = token_adapter_slots(plan, {aid: 1 + 2 * i for i, aid in enumerate(adapters)}, n,
                                         hidden_nh.device, trainable_offset=True)
        counts = _gather_counts(n, ep, hidden_nh.device)
        width = max(counts)
        floats = torch.cat([hidden_nh, top_k_weights.to(hidden_nh.dtype)], dim=1)
        floats_all = _GatherRows.apply(floats, ep, width)
        ints = torch.cat([top_k_index, token_slot[:, None]], dim=1)
        ints_all = _gather_plain(ints, ep, width, fill=layer.num_experts)  # padding: a dropped choice
        hidden_all, weights_all = floats_all.split([hidden_nh.shape[1], top_k_index.shape[1]], dim=1)
        out_all = layer.grouped(hidden_all, ints_all[:, :-1], weights_all, ints_all[:, -1], slots,
                                out_nh=hidden_all * 0)  # keeps every rank's backward on the exchange
        return _SumRows.apply(out_all, ep, width, n)


def _gather_counts(n: int, ep: ExpertGroup, device: torch.device) -> list[int]:
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(ep.size)]
    dist.all_gather(counts, torch.tensor([n], dtype=torch.long, device=device), group=ep.group)
    return [int(c) for c in counts]


def _padded(rows: torch.Tensor, width: int, fill: float | int = 0) -> torch.Tensor:
    padded = rows.new_full((width, *rows.shape[1:]), fill)
    padded[: rows.shape[0]] = rows
    return padded


def _gather_plain(rows: torch.Tensor, ep: ExpertGroup, width: int, fill: int) -> torch.Tensor:
    """Every rank's rows, each padded to `width` with `fill`, in rank order (no gradient)."""
    padded = _padded(rows, width, fill)
    parts = [torch.empty_like(padded) for _ in range(ep.size)]
    dist.all_gather(parts, padded, group=ep.group)
    return torch.cat(parts)


class _GatherRows(torch.autograd.Function):
    """Forward: every rank's rows padded to `width`, in rank order. Backward: the gradient
    of this rank's rows summed over the ranks (each ran its experts on them)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, ep: ExpertGroup, width: int) -> torch.Tensor:
        ctx.ep, ctx.width, ctx.n = ep, width, rows.shape[0]
        padded = _padded(rows.detach(), width)
        parts = [torch.empty_like(padded) for _ in range(ep.size)]
        dist.all_gather(parts, padded, group=ep.group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad_all: torch.Tensor):
        grad_all = grad_all.contiguous().clone()
        dist.all_reduce(grad_all, group=ctx.ep.group)
        first = ctx.ep.rank * ctx.width
        return grad_all[first : first + ctx.n], None, None


class _SumRows(torch.autograd.Function):
    """Forward: the sum over ranks of their partial outputs, this rank's rows of it.
    Backward: every rank's output gradient, placed at its rows (an all-reduce)."""

    @staticmethod
    def forward(ctx, rows_all: torch.Tensor, ep: ExpertGroup, width: int, n: int) -> torch.Tensor:
        ctx.ep, ctx.width, ctx.n, ctx.shape = ep, width, n, rows_all.shape
        total = rows_all.detach().clone()
        dist.all_reduce(total, group=ep.group)
        first = ep.rank * width
        return total[first : first + n].clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full = grad.new_zeros(ctx.shape)
        first = ctx.ep.rank * ctx.width
        full[first : first + ctx.n] = grad
        dist.all_reduce(full, group=ctx.ep.group)
        return full, None, None, None
