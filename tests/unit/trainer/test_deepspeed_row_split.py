"""How a fused batch's rows are cut into contiguous per-rank shares (pure, no process group)."""

from __future__ import annotations

import numpy as np

from tunemesh_trainer.domain import DatumArrays, EngineItem, ItemKind
from tunemesh_trainer.engine.data_parallel import row_bounds, share_items


def _item(item_id: str, lengths: list[int]) -> EngineItem:
    data = [DatumArrays(np.zeros(n, dtype=np.int64), {"target_tokens": np.zeros(n, dtype=np.int64)}) for n in lengths]
    return EngineItem(item_id, "a", ItemKind.FORWARD_BACKWARD, data)


def test_bounds_balance_tokens_and_cover_every_row_once():
    assert row_bounds([10, 10, 10, 10], 2) == [0, 2, 4]
    assert row_bounds([30, 5, 5, 5, 5], 2) == [0, 1, 5]
    assert row_bounds([8], 2) == [0, 1, 1]  # the second rank gets no row
    assert row_bounds([], 3) == [0, 0, 0, 0]
    assert row_bounds([4, 4, 4], 1) == [0, 3]


def test_shares_keep_item_order_and_concatenate_back():
    items = [_item("x", [6, 9]), _item("y", [5]), _item("z", [4, 7, 3])]
    shares = [share_items(items, rank, 2) for rank in range(2)]
    assert [[len(i.data) for i in share] for share in shares] == [[2, 0, 0], [0, 1, 3]]
    for index, item in enumerate(items):
        joined = [d for share in shares for d in share[index].data]
        assert [id(d) for d in joined] == [id(d) for d in item.data]
        assert all(share[index].item_id == item.item_id for share in shares)
