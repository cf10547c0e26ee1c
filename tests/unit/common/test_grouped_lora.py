"""The grouped LoRA path of MultiLoraLinear (the trainer's: segments of one rank and one token
count in one batched matmul pair, gradients through the stacked factors): its output and
every gradient (input, A, B of trainable adapters; none for detached ones) against autograd
through LoRA computed segment by segment, and in batch-invariant mode a segment's numbers
bit for bit the same alone and grouped with others, on two threads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tunemesh_common.lora.multi_lora import LoraPair, LoraRouting, MultiLoraLinear, RowPlan
from tunemesh_common.numerics import batch_invariant

IN, OUT = 96, 160


def _layer(ranks: dict[str, int], invariant: bool = False, width: tuple[int, int] = (IN, OUT)) -> MultiLoraLinear:
    torch.manual_seed(0)
    layer = MultiLoraLinear(nn.Linear(*width).requires_grad_(False), LoraRouting())
    layer.routing.batch_invariant = invariant
    for seed, (aid, rank) in enumerate(ranks.items()):
        g = torch.Generator().manual_seed(seed + 1)
        layer.pairs[aid] = LoraPair(nn.Parameter(torch.randn(rank, width[0], generator=g) * 0.1),
                                    nn.Parameter(torch.randn(width[1], rank, generator=g) * 0.1), scale=2.0 / rank)
    return layer


def _run(layer: MultiLoraLinear, segments, trainable, x: torch.Tensor, real: torch.Tensor | None = None,
         weights: torch.Tensor | None = None):
    """Output, input gradient and factor gradients of sum(output * weights) (weights: given,
    else seeded)."""
    for pair in layer.pairs.values():
        pair.a.grad = pair.b.grad = None
    x = x.clone().requires_grad_(True)
    with layer.routing.use(RowPlan(tuple(segments), frozenset(trainable)), real_tokens=real):
        out = layer(x)
    if weights is None:
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weights).sum().backward()
    grads = {f"{aid}.{n}": getattr(pair, n).grad for aid, pair in layer.pairs.items() for n in ("a", "b")}
    return out.detach(), x.grad, grads


def _reference(layer: MultiLoraLinear, segments, trainable, x: torch.Tensor):
    """The same through autograd of per-segment LoRA (PEFT's order: x @ A.T @ B.T, then scale)."""
    for pair in layer.pairs.values():
        pair.a.grad = pair.b.grad = None
    x = x.clone().requires_grad_(True)
    out = layer.base(x)
    pieces = []
    for aid, start, end in segments:
        piece, pair = out[start:end], layer.pairs.get(aid)
        if pair is not None:
            a, b = (pair.a, pair.b) if aid in trainable else (pair.a.detach(), pair.b.detach())
            piece = piece + (x[start:end] @ a.T @ b.T) * pair.scale
        pieces.append(piece)
    out = torch.cat(pieces)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weights).sum().backward()
    grads = {f"{aid}.{n}": getattr(pair, n).grad for aid, pair in layer.pairs.items() for n in ("a", "b")}
    return out.detach(), x.grad, grads


LAYOUTS = {
    "equal segments, one group": [("a", 0, 2), ("b", 2, 4), ("c", 4, 6)],
    "unequal segments": [("a", 0, 1), ("b", 1, 4), ("c", 4, 6)],
    "mixed ranks": [("a", 0, 2), ("d", 2, 4), ("b", 4, 6)],
    "base rows and unknown adapters between": [("", 0, 1), ("a", 1, 3), ("zz", 3, 4), ("b", 4, 6)],
    "one adapter twice": [("a", 0, 2), ("b", 2, 4), ("a", 4, 6)],
}


@pytest.mark.parametrize("invariant", [False, True], ids=["fast", "invariant"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_grouped_lora_and_its_gradients_equal_per_segment_autograd(layout, invariant):
    layer = _layer({"a": 4, "b": 4, "c": 4, "d": 8}, invariant)
    x = torch.randn(6, 5, IN, generator=torch.Generator().manual_seed(3))
    trainable = {"a", "c", "d"}  # b is used detached
    out, grad_x, grads = _run(layer, layout, trainable, x)
    ref_out, ref_grad_x, ref_grads = _reference(layer, layout, trainable, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=1e-5, atol=1e-5)
    used = {aid for aid, _, _ in layout}
    for name, grad in grads.items():
        if name.split(".")[0] in trainable & used:
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-5)
        else:
            assert grad is None and ref_grads[name] is None, name


def test_padding_is_skipped_in_batch_invariant_mode():
    """real_tokens marks padding: LoRA leaves padded positions as the base's and the factors'
    gradients sum over the real tokens only (the same as the rows cut to their length)."""
    layer = _layer({"a": 4, "b": 4}, invariant=True)
    x = torch.randn(3, 6, IN, generator=torch.Generator().manual_seed(4))
    real = torch.ones(3, 6, dtype=torch.bool)
    real[0, 4:] = real[2, 2:] = False
    segments = [("a", 0, 2), ("b", 2, 3)]
    out, _, grads = _run(layer, segments, {"a", "b"}, x, real.reshape(-1))
    padded = ~real
    assert torch.equal(out[padded], layer.base(x)[padded])
    cut = x.clone()
    cut[padded] = 0.0  # zero inputs add nothing to the factors' gradients
    _, _, ref_grads = _reference(layer, segments, {"a", "b"}, cut)
    for name in ("a.a", "a.b", "b.a", "b.b"):
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(batch_invariant._THREAD_LOCAL is None, reason="this torch build has no per-thread thread counts")
@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_a_segment_s_numbers_are_the_same_bits_alone_and_grouped(two_threads, tokens):
    """Alone, a segment's two GEMMs (and four in the backward) are one matrix on one thread;
    grouped with others of its rank and length, one matrix of several, each on one thread: the
    same bits, output, input gradient and factor gradients. (Alone on two threads, 7 rows of
    576 x 16 summed otherwise on this project's hosts.)"""
    layer = _layer({"mine": 16, "o1": 16, "o2": 16, "o3": 8}, invariant=True, width=(576, 1536))
    g = torch.Generator().manual_seed(tokens)
    x_mine, w_mine = torch.randn(1, tokens, 576, generator=g), torch.randn(1, tokens, 1536, generator=g)
    alone = _run(layer, [("mine", 0, 1)], {"mine"}, x_mine, weights=w_mine)
    crowd, w_crowd = (torch.cat([torch.randn(2, tokens, n, generator=g), mine, torch.randn(2, tokens, n, generator=g)])
                      for n, mine in ((576, x_mine), (1536, w_mine)))
    grouped = _run(layer, [("o1", 0, 1), ("o3", 1, 2), ("mine", 2, 3), ("o2", 3, 4), ("o1", 4, 5)],
                   {"mine", "o1", "o2", "o3"}, crowd, weights=w_crowd)
    assert torch.equal(alone[0][0], grouped[0][2])
    assert torch.equal(alone[1][0], grouped[1][2])
    for name in ("mine.a", "mine.b"):
        assert torch.equal(alone[2][name], grouped[2][name]), name


@pytest.mark.parametrize("tokens", [1, 2, 9])
def test_in_batch_invariant_mode_grouped_rows_are_the_sampler_s_bits(two_threads, tokens):
    """The trainer's forward (grouped) and the sampler's batched decode give a row the same
    bits: both run each GEMM on one thread with at least 4 rows (fewer are padded)."""
    layer = _layer({"a": 8, "b": 8, "c": 8}, invariant=True, width=(576, 1536))
    x = torch.randn(3, tokens, 576, generator=torch.Generator().manual_seed(tokens))
    for segments in ([("a", 0, 1)], [("a", 0, 1), ("b", 1, 2), ("c", 2, 3)]):
        rows = segments[-1][2]
        with torch.no_grad():
            with layer.routing.use(RowPlan(tuple(segments), frozenset())):
                grouped = layer(x[:rows])
            with layer.routing.use(RowPlan(tuple(segments), frozenset()), batched=True):
                batched = layer(x[:rows])
        assert torch.equal(grouped, batched)
