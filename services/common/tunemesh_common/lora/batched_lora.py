"""Every adapter's LoRA on one linear in two batched matmuls (inference only).

Segment by segment, LoRA costs per adapter of the batch a split, two small matmuls, a
scale and an add, then a cat of the pieces. In a decode step of 64 rows
over 8 adapters that is ~40 small operations on each of SmolLM2's 210 linears, and their
fixed cost (not their FLOPs) made LoRA add ~47 % to the step. Here the adapters' factors
are stacked once per set of adapters, the rows of each adapter are laid out as one slab
of a `(segments, rows, in)` tensor (a view when the segments are equal and contiguous, a
gather otherwise) and LoRA is `bmm(bmm(x, A.T), B.T) * scale`, added in place: five
operations whatever the number of adapters (the segmented-matmul idea of Punica / S-LoRA,
in plain torch).

Same arithmetic per row as `MultiLoraLinear._grouped` (the trainer's path, which groups
segments of one rank and length and records gradients through the stacked factors), x @
A.T then @ B.T then * scale, in the factors' dtype (float32), with the factors row-major
and used transposed: each GEMM of a batched matmul of several matrices runs on one
thread, so under batch-invariant mode (rows padded to 4) the two give the same bits.
Factors of lower rank are padded with zero rows / columns up to the largest rank of the
set (`StackedFactors.uniform_rank` tells whether any was). No autograd, and the factors
are stacked once per set of adapters (a decode loop reuses them every step).
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import torch

STACKS_KEPT = 4  # adapter sets whose stacked factors a linear keeps (rows join and leave)


@dataclasses.dataclass(frozen=True)
class SegmentLayout:
    """Where the rows of the segments with LoRA go in a `(segments, width)` slab layout.

    `start` >= 0: the segments are all `width` rows long and back to back from row `start`,
    so the slab is a view. Otherwise `gather[s * width + j]` is the row of slab position
    (s, j), with `rows` (an appended zero row) as padding, and `valid` / `targets` list the
    slab positions holding real rows and the rows they belong to."""

    segments: int
    width: int
    start: int
    gather: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    targets: torch.Tensor | None = None


@functools.lru_cache(maxsize=64)
def segment_layout(bounds: tuple[tuple[int, int], ...], rows: int, device: torch.device) -> SegmentLayout:
    """The slab layout of row ranges `bounds` ((first, end) per segment, in row order) of a
    batch of `rows` rows; cached, as one decode loop asks for the same layout every step."""
    width = max(end - first for first, end in bounds)
    contiguous = all(end - first == width for first, end in bounds) and all(
        bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))
    if contiguous:
        return SegmentLayout(len(bounds), width, bounds[0][0])
    gather = torch.full((len(bounds) * width,), rows, dtype=torch.long)
    for s, (first, end) in enumerate(bounds):
        gather[s * width : s * width + end - first] = torch.arange(first, end)
    valid = torch.nonzero(gather < rows).squeeze(1)
    return SegmentLayout(len(bounds), width, -1, gather.to(device), valid.to(device), gather[valid.cpu()].to(device))


@dataclasses.dataclass(frozen=True)
class StackedFactors:
    """The factors of a set of adapters on one linear: A as (S, r, in), B as (S, out, r),
    scales (S, 1, 1); `pairs` are the LoraPair objects they were stacked from."""

    pairs: tuple[object, ...]
    a: torch.Tensor
    b: torch.Tensor
    scale: torch.Tensor
    uniform_rank: bool  # every adapter of the set has the stack's rank (no zero padding)


def stack_factors(pairs: list) -> StackedFactors:
    """Stack `pairs` (LoraPair, one per segment), padding lower ranks with zeros."""
    rank = max(p.rank for p in pairs)
    first = pairs[0].a
    in_f, out_f = first.shape[1], pairs[0].b.shape[0]
    a = first.new_zeros(len(pairs), rank, in_f)
    b = first.new_zeros(len(pairs), out_f, rank)
    for s, pair in enumerate(pairs):
        a[s, : pair.rank] = pair.a.detach()
        b[s, :, : pair.rank] = pair.b.detach()
    scale = torch.tensor([p.scale for p in pairs], dtype=first.dtype, device=first.device).view(-1, 1, 1)
    return StackedFactors(tuple(pairs), a, b, scale, all(p.rank == rank for p in pairs))


class StackCache:
    """A linear's recently used stacks, by adapter ids; a stack is rebuilt when any of its
    adapters' factors changed (a reload under the same id is a different LoraPair)."""

    def __init__(self) -> None:
        self._stacks: collections.OrderedDict[tuple[str, ...], StackedFactors] = collections.OrderedDict()

    def get(self, adapter_ids: tuple[str, ...], pairs: list) -> StackedFactors:
        stacked = self._stacks.get(adapter_ids)
        if stacked is None or any(a is not b for a, b in zip(stacked.pairs, pairs, strict=True)):
            stacked = stack_factors(pairs)
            self._stacks[adapter_ids] = stacked
            while len(self._stacks) > STACKS_KEPT:
                self._stacks.popitem(last=False)
        self._stacks.move_to_end(adapter_ids)
        return stacked


def add_batched_lora(x: torch.Tensor, out: torch.Tensor, rows: int, bounds: tuple[tuple[int, int], ...],
                     stacked: StackedFactors, min_rows: int = 0, bmm=torch.bmm) -> torch.Tensor:
    """`out` (the base linear's output of `x`, `rows` rows first) plus each segment's LoRA,
    the segments being the row ranges `bounds` in the order of `stacked`'s adapters; `out`
    is updated in place and returned. `min_rows`: each segment's slab is padded with zero
    rows up to it once, for both matmuls (batch-invariant mode asks that many rows); `bmm`:
    torch's, or batch_invariant's padded one."""
    x_r = x.reshape(rows, -1, x.shape[-1])
    out_r = out.view(rows, -1, out.shape[-1])
    length = x_r.shape[1]
    layout = segment_layout(bounds, rows, x.device)
    if layout.start >= 0:
        x_g = x_r[layout.start : layout.start + layout.segments * layout.width]
    else:
        x_g = torch.cat([x_r, x_r.new_zeros(1, length, x_r.shape[-1])]).index_select(0, layout.gather)
    slab_rows = layout.width * length
    x_g = x_g.reshape(layout.segments, slab_rows, -1).to(stacked.a.dtype)
    if slab_rows < min_rows:
        x_g = torch.cat([x_g, x_g.new_zeros(layout.segments, min_rows - slab_rows, x_g.shape[-1])], dim=1)
    hidden = bmm(x_g, stacked.a.transpose(1, 2))
    delta = (bmm(hidden, stacked.b.transpose(1, 2)) * stacked.scale).to(out.dtype)
    delta = delta[:, :slab_rows].reshape(layout.segments * layout.width, length, -1)
    if layout.start >= 0:
        out_r[layout.start : layout.start + len(delta)] += delta
    else:
        out_r.index_add_(0, layout.targets, delta.index_select(0, layout.valid))
    return out
