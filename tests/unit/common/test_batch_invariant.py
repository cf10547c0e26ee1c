"""BatchInvariantMode on the running host: a row's result is the same bits in a GEMM of
any number of rows (1 ... 3x the padding threshold, against 600), for 2-D linears and for
batched matmuls of one or several matrices, with 1 and 2 threads. If this host's BLAS
sums small GEMMs another way than measured (batch_invariant.py), these tests say so."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunemesh_common.numerics.batch_invariant import BatchInvariantMode, gemm_rows


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


def _rows_agree(compute, full: torch.Tensor, ref: torch.Tensor) -> list[int]:
    """Row counts m whose result differs from the first m rows of `ref`."""
    return [m for m in range(1, 3 * gemm_rows() + 1) if not torch.equal(compute(full[:m]), ref[:m])]


@pytest.mark.parametrize("out_features,in_features", [(576, 576), (1536, 576), (8, 576), (576, 8)])
def test_linear_rows_do_not_depend_on_the_row_count(threads, out_features, in_features):
    g = torch.Generator().manual_seed(out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(600, in_features, generator=g)
    ref, ref_matmul = F.linear(x, weight), (x.reshape(1, -1, in_features) @ weight.T)[0]
    with BatchInvariantMode():
        assert _rows_agree(lambda rows: F.linear(rows, weight), x, ref) == []
        assert _rows_agree(lambda rows: (rows.reshape(1, -1, in_features) @ weight.T)[0], x, ref_matmul) == []


@pytest.mark.parametrize("matrices", [1, 2, 6])
def test_batched_matmul_rows_do_not_depend_on_the_row_count(threads, matrices):
    g = torch.Generator().manual_seed(matrices)
    b = torch.randn(matrices, 64, 48, generator=g)
    a = torch.randn(matrices, 600, 64, generator=g)
    ref = torch.bmm(a, b)
    with BatchInvariantMode():
        assert [m for m in range(1, 3 * gemm_rows() + 1) if not torch.equal(torch.bmm(a[:, :m].contiguous(), b),
                                                                            ref[:, :m])] == []


def test_without_the_mode_a_single_row_is_summed_otherwise():
    """What the mode is for, on this host: M = 1 takes another kernel (if a BLAS ever sums
    it the same way, the padding is merely unneeded)."""
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(576, 576, generator=g), torch.randn(600, 576, generator=g)
    single, batched = F.linear(x[:1], weight), F.linear(x, weight)[:1]
    with BatchInvariantMode():
        assert torch.equal(F.linear(x[:1], weight), batched)
    if torch.equal(single, batched):
        pytest.skip("this BLAS sums one row like many")
