"""Batch-invariant matmuls on CPU: a row's result never depends on how many rows share its GEMM.

A linear's output row is a dot product per output feature, but the BLAS picks its kernel
(and with it the order in which each dot product is summed) from the matrix sizes. MKL,
measured on this project's hosts, sums a row in one of three orders: M = 1 (GEMV), a
thread's share of the rows under 4 (small-M kernel), and every other case. With one
thread every M >= 4 gives the same bits for every row, at any row position; with two
threads every M >= 12 (each thread then gets >= 4 rows). Batched matmuls of two or more
matrices run each GEMM on one thread: M >= 4. So a decode step of 1 row, a prefill of 1,000 rows and a
training chunk of 8,192 rows give a row the same bits, provided no GEMM runs with fewer
rows than those thresholds (a bmm of one matrix behaves like a 2-D GEMM):
`BatchInvariantMode` pads such GEMMs with zero rows (and drops
their results). `tests/unit/common/test_batch_invariant.py` scans M on the running host
so a BLAS that behaves otherwise fails the suite, not a tenant's run.

What it costs is the padding: only GEMMs below the threshold grow (decode steps of few rows,
a MoE expert that got few tokens, attention over few query rows); large ones run as before.
Row-wise reductions (RMSNorm's mean, softmax, log_softmax) were measured invariant to the
number of rows and to a masked tail as they are; attention's sum over key positions is not
(its length changes with the batch): see `attention.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

BATCHED_GEMM_ROWS = 4  # bmm of several matrices: one thread per GEMM


def gemm_rows() -> int:
    """The fewest rows a 2-D GEMM needs for its row results to be the same as in any larger
    GEMM: 4 with one thread, 12 with two (measured: MKL hands rows out 8 at a time, and
    each thread's share must be 4 or more)."""
    return 8 * max(1, torch.get_num_threads()) - 4


def batched_gemm_rows(matrices: int) -> int:
    """The fewest rows per matrix a batched matmul of `matrices` matrices needs."""
    return BATCHED_GEMM_ROWS if matrices > 1 else gemm_rows()


def _pad_rows(x: torch.Tensor, rows: int, axis: int) -> torch.Tensor:
    """`x` with zero rows appended along `axis` up to `rows`."""
    shape = list(x.shape)
    shape[axis] = rows - x.shape[axis]
    return torch.cat([x, x.new_zeros(shape)], dim=axis)


def _flat_rows(func: Callable, x: torch.Tensor, *rest, **kwargs) -> torch.Tensor:
    """`func(x, *rest)` for a function that multiplies every row of `x` (all but its last
    axis) by one matrix, with the rows padded to `gemm_rows()`."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    need = gemm_rows()
    x = x.contiguous()  # a strided input reaches the BLAS copied or not depending on its shape
    if rows == 0 or rows >= need:
        return func(x, *rest, **kwargs)
    out = func(_pad_rows(x.reshape(rows, x.shape[-1]), need, 0), *rest, **kwargs)
    return out[:rows].reshape(*x.shape[:-1], out.shape[-1])


def _linear(func, input, weight, bias=None):
    return _flat_rows(func, input, weight, bias) if input.dim() >= 1 else func(input, weight, bias)


def _matmul(func, a, b, **kwargs):
    if a.dim() < 2 or b.dim() < 2:
        return func(a, b, **kwargs)
    if b.dim() == 2:  # one matrix for every row of `a`: torch folds the rows into one GEMM
        return _flat_rows(func, a, b, **kwargs)
    rows = a.shape[-2]
    need = batched_gemm_rows(max(a.shape[:-2].numel(), b.shape[:-2].numel()))
    if rows == 0 or rows >= need:
        return func(a, b, **kwargs)
    return func(_pad_rows(a, need, -2), b, **kwargs)[..., :rows, :]


def _mm(func, a, b, **kwargs):
    return _flat_rows(func, a, b, **kwargs)


def _addmm(func, input, mat1, mat2, **kwargs):
    rows, need = mat1.shape[0], gemm_rows()
    if rows == 0 or rows >= need:
        return func(input, mat1, mat2, **kwargs)
    if input.dim() == 2 and input.shape[0] == rows:
        input = _pad_rows(input, need, 0)
    return func(input, _pad_rows(mat1, need, 0), mat2, **kwargs)[:rows]


_PADDED: dict[Callable, Callable] = {
    F.linear: _linear,
    torch.matmul: _matmul,
    torch.Tensor.matmul: _matmul,
    torch.Tensor.__matmul__: _matmul,
    torch.bmm: _matmul,
    torch.Tensor.bmm: _matmul,
    torch.mm: _mm,
    torch.Tensor.mm: _mm,
    torch.addmm: _addmm,
    torch.Tensor.addmm: _addmm,
}


class BatchInvariantMode(TorchFunctionMode):
    """While active (on this thread), the matmuls above never run below their row thresholds."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        padded = _PADDED.get(func)
        if padded is None:
            return func(*args, **(kwargs or {}))
        return padded(func, *args, **(kwargs or {}))
