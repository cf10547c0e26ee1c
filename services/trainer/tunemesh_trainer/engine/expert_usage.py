"""Expert utilisation per item: how many of an item's tokens each MoE layer routed to each expert."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from tunemesh_common.lora.multi_lora import LoraRouting


class ExpertUsage:
    """Token counts per (MoE layer, expert) for each item of a fused pass, over its chunks.

    Padding is not counted; a token that chose k experts counts once for each.
    """

    def __init__(self) -> None:
        self._counts: dict[int, torch.Tensor] = {}  # item index -> (layers, experts)
        self._chunk: list[torch.Tensor] = []  # per layer call of the running chunk: (rows, experts)

    @contextlib.contextmanager
    def listen(self, routing: LoraRouting, lengths: list[int]) -> Iterator[None]:
        """Record the expert choices of every MoE layer while a chunk of rows with these
        token counts runs."""
        self._chunk = []
        valid_bt = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]

        def record(top_k_index: torch.Tensor, num_experts: int) -> None:
            self._chunk.append(_row_counts(top_k_index.detach().cpu(), valid_bt, num_experts))

        routing.on_route = record
        try:
            yield
        finally:
            routing.on_route = None

    def absorb(self, item_index: int, first_row: int, num_rows: int) -> None:
        """Add the running chunk's counts over rows [first_row, first_row + num_rows) to an item."""
        if not self._chunk:
            return
        counts_le = torch.stack([c[first_row : first_row + num_rows].sum(0) for c in self._chunk])
        previous = self._counts.get(item_index)
        self._counts[item_index] = counts_le if previous is None else previous + counts_le

    @property
    def counts(self) -> dict[int, torch.Tensor]:
        """Item index -> (layers, experts) token counts so far."""
        return dict(self._counts)

    def combine(self, counts: list[dict[int, torch.Tensor]]) -> None:
        """Replace the counts by the sum of several (e.g. every rank's share of the batch)."""
        total: dict[int, torch.Tensor] = {}
        for share in counts:
            for index, counts_le in share.items():
                total[index] = counts_le if index not in total else total[index] + counts_le
        self._counts = total

    def metrics(self, item_index: int) -> dict[str, float]:
        """`e_frac_with_tokens:mean` (share of (layer, expert) pairs given any token) and
        `e_tokens_per_expert:{mean,min,max}` over (layer, expert) pairs; {} without MoE layers."""
        counts_le = self._counts.get(item_index)
        if counts_le is None:
            return {}
        counts_le = counts_le.to(torch.float64)
        return {
            "e_frac_with_tokens:mean": float((counts_le > 0).to(torch.float64).mean()),
            "e_tokens_per_expert:mean": float(counts_le.mean()),
            "e_tokens_per_expert:min": float(counts_le.min()),
            "e_tokens_per_expert:max": float(counts_le.max()),
        }


def _row_counts(top_k_index: torch.Tensor, valid_bt: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(rows, experts) counts of real tokens' choices; choices >= num_experts (dropped) are ignored."""
    rows, width = valid_bt.shape
    index_btk = top_k_index.reshape(rows, width, -1)
    keep_btk = valid_bt[:, :, None].expand_as(index_btk) & (index_btk < num_experts)
    row_btk = torch.arange(rows)[:, None, None].expand_as(index_btk)
    flat = row_btk[keep_btk] * num_experts + index_btk[keep_btk]
    return torch.bincount(flat, minlength=rows * num_experts).reshape(rows, num_experts)
