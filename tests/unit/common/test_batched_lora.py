"""Both LoRA paths of MultiLoraLinear, the sampler's batched one (every adapter of a batch in
two bmm calls) and the grouped one (`_grouped`, also the trainer's), against LoRA computed
segment by segment here, on the layouts a sampler's batches take: equal contiguous
segments, unequal ones, rows without an adapter between them, ranks that differ, adapters
without factors on the linear, a bfloat16 base, and factors reloaded under the same id."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tunemesh_common.lora.batched_lora import segment_layout
from tunemesh_common.lora.multi_lora import LoraPair, LoraRouting, MultiLoraLinear, RowPlan

IN, OUT = 24, 40


def _pair(rank: int, seed: int, dtype=torch.float32) -> LoraPair:
    g = torch.Generator().manual_seed(seed)
    a = nn.Parameter(torch.randn(rank, IN, generator=g), requires_grad=False)
    b = nn.Parameter(torch.randn(OUT, rank, generator=g), requires_grad=False)
    return LoraPair(a, b, scale=2.0 / rank)


def _linear(base_dtype=torch.float32) -> MultiLoraLinear:
    torch.manual_seed(0)
    layer = MultiLoraLinear(nn.Linear(IN, OUT).to(base_dtype), LoraRouting())
    layer.pairs = {"a": _pair(4, 1), "b": _pair(8, 2), "c": _pair(2, 3)}
    return layer


def _per_segment(layer: MultiLoraLinear, segments, x: torch.Tensor) -> torch.Tensor:
    """The base plus each segment's own adapter's scale * x @ A.T @ B.T, one segment at a time."""
    out = layer.base(x)
    pieces = []
    for aid, start, end in segments:
        piece = out[start:end]
        pair = layer.pairs.get(aid)
        if pair is not None:
            piece = piece + ((x[start:end].to(pair.a.dtype) @ pair.a.T @ pair.b.T) * pair.scale).to(out.dtype)
        pieces.append(piece)
    return torch.cat(pieces)


def _both(layer: MultiLoraLinear, segments, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batched path's output, and the grouped path's after checking it against `_per_segment`."""
    plan = RowPlan(tuple(segments), frozenset())
    with torch.no_grad():
        with layer.routing.use(plan):
            grouped = layer(x)
        with layer.routing.use(plan, batched=True):
            batched = layer(x)
        tolerance = 1e-2 if x.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(grouped, _per_segment(layer, segments, x), rtol=tolerance, atol=tolerance)
    return batched, grouped


LAYOUTS = {
    "equal, contiguous": [("a", 0, 3), ("b", 3, 6), ("c", 6, 9)],
    "unequal": [("a", 0, 1), ("b", 1, 6), ("c", 6, 8)],
    "base rows between": [("", 0, 2), ("a", 2, 4), ("", 4, 5), ("b", 5, 7)],
    "no factors here": [("a", 0, 2), ("zz", 2, 4), ("c", 4, 6)],
    "one segment": [("b", 0, 5)],
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("length", [1, 7])
def test_batched_equals_segment_by_segment(layout, length):
    layer = _linear()
    rows = layout[-1][2]
    x = torch.randn(rows, length, IN, generator=torch.Generator().manual_seed(5))
    batched, reference = _both(layer, layout, x)
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-5)
    base = layer.base(x)
    for aid, start, end in layout:  # rows without factors here are the base's, exactly
        if aid not in layer.pairs:
            assert torch.equal(batched[start:end], base[start:end])
        else:
            assert not torch.allclose(batched[start:end], base[start:end])


def test_bfloat16_base_keeps_lora_in_float32():
    layer = _linear(torch.bfloat16)
    x = torch.randn(6, 3, IN).to(torch.bfloat16)
    batched, reference = _both(layer, LAYOUTS["unequal"][:2], x)
    assert batched.dtype == torch.bfloat16
    torch.testing.assert_close(batched, reference, rtol=1e-2, atol=1e-2)


def test_reloaded_factors_under_the_same_id_are_used():
    layer = _linear()
    x = torch.randn(4, 1, IN)
    segments = [("a", 0, 2), ("b", 2, 4)]
    first, _ = _both(layer, segments, x)
    layer.pairs["a"] = _pair(4, 99)  # a new version of adapter a
    second, reference = _both(layer, segments, x)
    torch.testing.assert_close(second, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first[:2], second[:2])
    assert torch.equal(first[2:], second[2:])


def test_a_trainable_plan_cannot_be_batched():
    with pytest.raises(ValueError, match="trainable"), LoraRouting().use(RowPlan((("a", 0, 1),), frozenset({"a"})), batched=True):
        pass


def test_layouts():
    equal = segment_layout(((2, 4), (4, 6)), 6, torch.device("cpu"))
    assert (equal.segments, equal.width, equal.start) == (2, 2, 2)
    gapped = segment_layout(((0, 1), (3, 6)), 7, torch.device("cpu"))
    assert (gapped.width, gapped.start) == (3, -1)
    assert gapped.gather.tolist() == [0, 7, 7, 3, 4, 5]
    assert gapped.valid.tolist() == [0, 3, 4, 5]
    assert gapped.targets.tolist() == [0, 3, 4, 5]
