"""Packing the datums of many items into one right-padded batch, one row per datum."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from tunemesh_trainer.domain import EngineItem, ItemKind
from tunemesh_common.lora.multi_lora import RowPlan

PAD_TOKEN_ID = 0


@dataclasses.dataclass
class PackedBatch:
    """Right-padded token rows, their positions, and the row -> adapter plan."""

    tokens_bt: torch.Tensor  # int64 (rows, max_len)
    positions_bt: torch.Tensor  # int64 (rows, max_len): 0..max_len-1 in every row
    plan: RowPlan
    first_rows: list[int]  # per item: index of its first row
    real_bt: torch.Tensor  # bool (rows, max_len): the row's own tokens, not padding


def pack_targets(items: Sequence[EngineItem], shape_bt: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Every datum's target_tokens as (rows, T, K): (N,) targets get K = 1; padding is 0."""
    targets = [torch.tensor(d.loss_inputs["target_tokens"], dtype=torch.long).reshape(
        int(d.tokens.shape[0]), -1) for item in items for d in item.data]
    k_max = max(t.shape[1] for t in targets)
    targets_btk = torch.zeros((*shape_bt, k_max), dtype=torch.long)
    for row, t in enumerate(targets):
        targets_btk[row, : t.shape[0], : t.shape[1]] = t
    return targets_btk.to(device)


def pack_items(items: Sequence[EngineItem], device: torch.device) -> PackedBatch:
    """Rows follow item order, then datum order. Padding sits after each row's tokens,
    so with causal attention no real token sees a pad token."""
    lengths = [int(d.tokens.shape[0]) for item in items for d in item.data]
    tokens_bt = torch.full((len(lengths), max(lengths)), PAD_TOKEN_ID, dtype=torch.long)
    segments, first_rows, row = [], [], 0
    for item in items:
        first_rows.append(row)
        for datum in item.data:
            tokens_bt[row, : datum.tokens.shape[0]] = torch.as_tensor(datum.tokens, dtype=torch.long)
            row += 1
        if segments and segments[-1][0] == item.adapter_id:
            segments[-1] = (item.adapter_id, segments[-1][1], row)
        else:
            segments.append((item.adapter_id, first_rows[-1], row))
    trainable = frozenset(i.adapter_id for i in items if i.kind is ItemKind.FORWARD_BACKWARD)
    plan = RowPlan(segments=tuple(segments), trainable=trainable)
    positions_bt = torch.arange(tokens_bt.shape[1]).expand_as(tokens_bt)
    real_bt = positions_bt < torch.tensor(lengths)[:, None]
    return PackedBatch(tokens_bt.to(device), positions_bt.to(device), plan, first_rows, real_bt.to(device))


@dataclasses.dataclass
class ChunkPart:
    """Some consecutive datums of one item, placed in one chunk of the fused pass."""

    index: int  # the item's position in the batch
    item: EngineItem  # the item restricted to these datums


def plan_chunks(items: Sequence[EngineItem], max_padded_tokens: int) -> list[list[ChunkPart]]:
    """Split the batch's rows into chunks of at most `max_padded_tokens` padded tokens
    (rows x longest row), in order; a row never spans chunks. An item that does not fit
    whole in the current chunk starts a new one, so where an item is split (only when it
    alone exceeds the budget) depends on the item alone: its gradient is summed in the same
    groups whatever else shares the batch. Rows are independent, so chunking bounds memory
    without changing any row's numbers."""
    chunks: list[list[ChunkPart]] = [[]]
    rows, longest = 0, 0
    for index, item in enumerate(items):
        own_longest = max((int(d.tokens.shape[0]) for d in item.data), default=0)
        if rows and (rows + len(item.data)) * max(longest, own_longest) > max_padded_tokens:
            chunks.append([])
            rows, longest = 0, 0
        for datum in item.data:
            n = int(datum.tokens.shape[0])
            if rows and (rows + 1) * max(longest, n) > max_padded_tokens:
                chunks.append([])
                rows, longest = 0, 0
            chunk = chunks[-1]
            if not chunk or chunk[-1].index != index:
                chunk.append(ChunkPart(index, dataclasses.replace(item, data=[])))
            chunk[-1].item.data.append(datum)
            rows, longest = rows + 1, max(longest, n)
    return [chunk for chunk in chunks if chunk]



# A lane may hold at most this share of a batch's tokens: two lanes on two cores run a fused
# SmolLM2 step 1.15-1.2x faster than one pass on two OpenMP threads (bench/README.md,
# "Lanes"), so a split less even than 60/40 would lose that to its longer lane.
LANE_MAX_SHARE = 0.6


def plan_lanes(items: Sequence[EngineItem], lanes: int, max_share: float = LANE_MAX_SHARE) -> list[list[int]] | None:
    """The batch's item indices split into `lanes` groups that run at once, one thread each:
    every item of an adapter in one lane (an adapter's gradient is then summed as in one
    pass), adapters placed largest first on the lane with fewest tokens; each lane's indices
    in batch order. None where a split does not pay: fewer than two adapters, or a lane
    with more than `max_share` of the tokens."""
    tokens: dict[str, int] = {}
    for item in items:
        tokens[item.adapter_id] = tokens.get(item.adapter_id, 0) + sum(int(d.tokens.shape[0]) for d in item.data)
    total = sum(tokens.values())
    if lanes < 2 or len(tokens) < 2 or total == 0:
        return None
    loads, lane_of = [0] * min(lanes, len(tokens)), {}
    for adapter_id in sorted(tokens, key=lambda a: (-tokens[a], a)):
        lane = loads.index(min(loads))
        lane_of[adapter_id] = lane
        loads[lane] += tokens[adapter_id]
    if max(loads) > max_share * total:
        return None
    plan: list[list[int]] = [[] for _ in loads]
    for index, item in enumerate(items):
        plan[lane_of[item.adapter_id]].append(index)
    return plan
