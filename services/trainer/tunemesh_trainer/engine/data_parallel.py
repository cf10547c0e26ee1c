"""How a fused batch spreads over processes: a strategy the torch engine runs every pass through.

`SingleProcess`: this process runs every row. `DataParallel`: each rank of a process group
runs a share of the rows. Every rank sees the whole batch and cuts the same contiguous
shares (balanced by tokens), so merging per-item outputs is concatenation in rank order.
After the rows ran, LoRA gradients are summed across ranks and the per-item outcomes are
gathered, so every rank settles gradients (and later steps each adapter's AdamW) on
identical numbers. `parallelism` picks one for a rank of a group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

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


class Parallelism(Protocol):
    """How the torch engine's fused pass is spread over processes."""

    # Whether a failed fused pass may re-run its items one by one on this process alone
    # (not while other ranks wait inside collectives).
    retries_alone: bool
    # Whether every pass must run a backward through every layer even without a trainable
    # row here (the other ranks' collectives inside the backward need this rank's).
    walks_all_layers: bool
    # Whether several passes may run at once on threads of this process (each its own rows:
    # nothing inside a pass waits for another process).
    concurrent_passes: bool

    def prepare(self, model: torch.nn.Module) -> None:
        """Adjust the loaded base model for this strategy (once, before any pass)."""

    def local_items(self, items: Sequence[EngineItem]) -> list[EngineItem]:
        """The items restricted to the rows this process runs (same length, in order)."""

    def pass_count(self, local_passes: int) -> int:
        """How many forward passes this process runs, given how many its rows need."""

    def reduce_gradients(self, slots: Sequence[AdapterSlot]) -> None:
        """Complete the fresh LoRA gradients (`.grad`) of these adapters, in place."""

    def merge_outcomes(self, outcomes: Sequence[ItemOutcome], usage: ExpertUsage) -> None:
        """Complete the partial outcomes and expert counts of this process, in place."""


class SingleProcess:
    """This process runs every row: every step is the identity."""

    retries_alone = True
    walks_all_layers = False

    def __init__(self, concurrent_passes: bool = True) -> None:
        self.concurrent_passes = concurrent_passes

    def prepare(self, model: torch.nn.Module) -> None:
        pass

    def local_items(self, items: Sequence[EngineItem]) -> list[EngineItem]:
        return list(items)

    def pass_count(self, local_passes: int) -> int:
        return local_passes

    def reduce_gradients(self, slots: Sequence[AdapterSlot]) -> None:
        pass

    def merge_outcomes(self, outcomes: Sequence[ItemOutcome], usage: ExpertUsage) -> None:
        pass


def parallelism(rank: int, world: int, device: str) -> Parallelism:
    """The strategy of rank `rank` of a process group of `world` ranks (the default
    torch.distributed group), whose collective buffers live on `device`. A group of one
    runs its passes one at a time: DeepSpeed's hooks gather weights per module call,
    for one pass at a time."""
    return SingleProcess(concurrent_passes=False) if world == 1 else DataParallel(rank, world, device)


class DataParallel:
    """This rank's place in a process group of W > 1 ranks (the default torch.distributed group)."""

    retries_alone = False
    walks_all_layers = True
    concurrent_passes = False

    def __init__(self, rank: int, world: int, device: str = "cpu") -> None:
        self.rank = rank
        self.world = world
        self.device = device  # where collective buffers live (nccl needs them on the GPU)

    def prepare(self, model: torch.nn.Module) -> None:
        """Make every rank's backward walk every layer (see `walks_all_layers`), also where
        none of its rows trains: the embeddings' output then requires grad."""
        model.enable_input_require_grads()

    def local_items(self, items: Sequence[EngineItem]) -> list[EngineItem]:
        return share_items(items, self.rank, self.world)

    def pass_count(self, local_passes: int) -> int:
        """The most forward passes any rank needs: every rank runs that many (ZeRO-3 gathers
        parameters collectively, so ranks must walk the model together)."""
        count = torch.tensor([local_passes], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        return int(count)

    def reduce_gradients(self, slots: Sequence[AdapterSlot]) -> None:
        """Sum the fresh LoRA gradients (`.grad`) of these adapters over ranks, in one all-reduce."""
        if not slots:
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
        local = ([(o.outputs, o.metrics, o.failure) for o in outcomes], usage.counts)
        shares: list = [None] * self.world
        torch.distributed.all_gather_object(shares, local)
        for index, outcome in enumerate(outcomes):
            parts = [share[0][index] for share in shares]
            outcome.outputs = [out for outputs, _, _ in parts for out in outputs]
            outcome.metrics = {key: sum(metrics[key] for _, metrics, _ in parts) for key in parts[0][1]}
            outcome.failure = next((failure for _, _, failure in parts if failure is not None), None)
        usage.combine([share[1] for share in shares])
