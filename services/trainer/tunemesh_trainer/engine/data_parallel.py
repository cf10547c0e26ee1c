"""Data parallelism over a fused batch: each rank of a process group runs a share of its rows.

Every rank sees the whole batch and cuts the same contiguous shares (balanced by tokens),
so merging per-item outputs is concatenation in rank order. After the rows ran, LoRA
gradients are summed across ranks and the per-item outcomes are gathered, so every rank
settles gradients (and later steps each adapter's AdamW) on identical numbers.
With one rank every method is the identity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from tunemesh_trainer.domain import EngineItem, ItemOutcome
from tunemesh_trainer.engine.adapter import AdapterSlot
from tunemesh_trainer.engine.expert_usage import ExpertUsage


def row_bounds(lengths: Sequence[int], world: int) -> list[int]:
    """World + 1 boundaries cutting rows (with these token counts) into contiguous shares of
    about equal token counts; rank r runs rows [bounds[r], bounds[r + 1])."""
    total, bounds, seen, row = sum(lengths), [0], 0, 0
    for rank in range(1, world):
        while row < len(lengths) and seen + lengths[row] / 2 <= total * rank / world:
            seen += lengths[row]
            row += 1
        bounds.append(row)
    return [*bounds, len(lengths)]


def share_items(items: Sequence[EngineItem], rank: int, world: int) -> list[EngineItem]:
    """The items restricted to this rank's rows (same length, in order; some may hold no datum)."""
    lengths = [int(d.tokens.shape[0]) for item in items for d in item.data]
    bounds = row_bounds(lengths, world)
    first, end, row, shared = bounds[rank], bounds[rank + 1], 0, []
    for item in items:
        lo, hi = max(first - row, 0), max(min(end - row, len(item.data)), 0)
        shared.append(dataclasses.replace(item, data=item.data[lo:hi]))
        row += len(item.data)
    return shared


class DataParallel:
    """This rank's place in the process group (the default torch.distributed group)."""

    def __init__(self, rank: int = 0, world: int = 1, device: str = "cpu") -> None:
        self.rank = rank
        self.world = world
        self.device = device  # where collective buffers live (nccl needs them on the GPU)

    def local_items(self, items: Sequence[EngineItem]) -> list[EngineItem]:
        return list(items) if self.world == 1 else share_items(items, self.rank, self.world)

    def pass_count(self, local_passes: int) -> int:
        """The most forward passes any rank needs: every rank runs that many (ZeRO-3 gathers
        parameters collectively, so ranks must walk the model together)."""
        if self.world == 1:
            return local_passes
        count = torch.tensor([local_passes], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        return int(count)

    def reduce_gradients(self, slots: Sequence[AdapterSlot]) -> None:
        """Sum the fresh LoRA gradients (`.grad`) of these adapters over ranks, in one all-reduce."""
        if self.world == 1 or not slots:
            return
        params = [p for slot in slots for p in slot.params]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        for param, piece in zip(params, torch.split(flat, [g.numel() for g in grads])):
            param.grad = piece.view_as(param).clone()

    def merge_outcomes(self, outcomes: Sequence[ItemOutcome], usage: ExpertUsage) -> None:
        """Join every rank's partial outcomes (outputs, metric sums, first failure) and expert
        counts, in place; afterwards all ranks hold the same outcomes."""
        if self.world == 1:
            return
        local = ([(o.outputs, o.metrics, o.failure) for o in outcomes], usage.counts)
        shares: list = [None] * self.world
        torch.distributed.all_gather_object(shares, local)
        for index, outcome in enumerate(outcomes):
            parts = [share[0][index] for share in shares]
            outcome.outputs = [out for outputs, _, _ in parts for out in outputs]
            outcome.metrics = {key: sum(metrics[key] for _, metrics, _ in parts) for key in parts[0][1]}
            outcome.failure = next((failure for _, _, failure in parts if failure is not None), None)
        usage.combine([share[1] for share in shares])
