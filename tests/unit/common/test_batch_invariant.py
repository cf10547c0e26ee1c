"""BatchInvariantMode on the running host: a row's result is the same bits in a GEMM of
any number of rows (1 ... 3x the padding threshold, against 600), for 2-D linears and for
batched matmuls of one or several matrices, with 1, 2 and 4 threads, float32 and bfloat16,
by both routes (a small GEMM on one thread where no gradient is recorded; padded to the
all-threads threshold where one is). If this host's BLAS sums small GEMMs another way
than measured (batch_invariant.py), these tests say so."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from tunemesh_common.numerics import batch_invariant
from tunemesh_common.numerics.batch_invariant import BatchInvariantMode, gemm_rows


@pytest.fixture(params=[1, 2, 4], ids=["1-thread", "2-threads", "4-threads"])
def threads(request):
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


def _rows_agree(compute, full: torch.Tensor, ref: torch.Tensor) -> list[int]:
    """Row counts m whose result differs from the first m rows of `ref`."""
    return [m for m in range(1, 3 * gemm_rows() + 1) if not torch.equal(compute(full[:m]), ref[:m])]


@pytest.fixture(params=[False, True], ids=["no-grad", "grad"])
def grad(request):
    """True: the weight records gradients, so small GEMMs are padded on every thread."""
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("out_features,in_features", [(576, 576), (1536, 576), (576, 1536), (8, 576), (576, 8)])
def test_linear_rows_do_not_depend_on_the_row_count(threads, grad, dtype, out_features, in_features):
    g = torch.Generator().manual_seed(out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=g).to(dtype).requires_grad_(grad)
    x = torch.randn(600, in_features, generator=g).to(dtype)
    ref, ref_matmul = F.linear(x, weight), (x.reshape(1, -1, in_features) @ weight.T)[0]
    with BatchInvariantMode():
        assert _rows_agree(lambda rows: F.linear(rows, weight), x, ref) == []
        assert _rows_agree(lambda rows: (rows.reshape(1, -1, in_features) @ weight.T)[0], x, ref_matmul) == []


@pytest.mark.parametrize("matrices", [1, 2, 6])
def test_batched_matmul_rows_do_not_depend_on_the_row_count(threads, grad, matrices):
    g = torch.Generator().manual_seed(matrices)
    b = torch.randn(matrices, 64, 48, generator=g).requires_grad_(grad)
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


def test_a_small_gemm_on_one_thread_leaves_the_thread_count_as_it_was():
    """The one-thread route sets MKL's and OpenMP's counts for the calling thread only and
    restores them: the process-wide count is unchanged, and a later unpadded 5-row GEMM
    outside the mode is still summed as two threads sum it (unlike the 600-row GEMM's rows)."""
    if batch_invariant._THREAD_LOCAL is None:
        pytest.skip("this build of torch has no per-thread thread counts: the padding route runs")
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(1)
        weight, x = torch.randn(576, 576, generator=g), torch.randn(600, 576, generator=g)
        ref = F.linear(x, weight)
        before = F.linear(x[:5], weight)
        if torch.equal(before, ref[:5]):
            pytest.skip("this BLAS sums 5 rows on two threads like 600")
        with BatchInvariantMode():
            assert torch.equal(F.linear(x[:5], weight), ref[:5])
        assert torch.get_num_threads() == 2
        assert torch.equal(F.linear(x[:5], weight), before)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("matrices", [0, 1, 8], ids=["linear", "bmm-1", "bmm-8"])
def test_gemms_of_enough_rows_give_the_same_bits_on_one_thread_as_on_two(matrices, dtype):
    """What running a decode step's LoRA and attention under `one_thread()` relies on: a GEMM
    of 4 rows or more per matrix (a batched one of several matrices) or of 12 or more (one
    matrix) sums each row on one thread as on two."""
    if batch_invariant._THREAD_LOCAL is None:
        pytest.skip("this build of torch has no per-thread thread counts")
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(matrices)
        if matrices:
            a, b = torch.randn(matrices, 64, 576, generator=g), torch.randn(matrices, 576, 192, generator=g)
            compute, rows = (lambda m: torch.bmm(a[:, :m].to(dtype).contiguous(), b.to(dtype))), \
                ([4, 5, 8, 13, 64] if matrices > 1 else [12, 13, 33, 64])
        else:
            a, b = torch.randn(64, 576, generator=g), torch.randn(1536, 576, generator=g)
            compute, rows = (lambda m: F.linear(a[:m].to(dtype), b.to(dtype))), [12, 13, 33, 64]
        for m in rows:
            two = compute(m)
            with batch_invariant.one_thread():
                one = compute(m)
            assert torch.equal(one, two), m
    finally:
        torch.set_num_threads(saved)


needs_dnn = pytest.mark.skipif(not batch_invariant._DNN, reason="this build of torch has no oneDNN linear")


@needs_dnn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("out_features,in_features", [(576, 576), (1536, 576), (576, 1536), (192, 576), (49152, 8),
                                                      (8, 576)])
def test_frozen_linear_rows_do_not_depend_on_the_row_count(threads, dtype, out_features, in_features):
    """oneDNN's linear (what a frozen base layer runs on): every row count from 1 (padded to
    DNN_ROWS) to 3x the MKL threshold and 600 sums a row alike, with or without a bias."""
    g = torch.Generator().manual_seed(out_features * in_features)
    weight = torch.randn(out_features, in_features, generator=g).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype)
    x = torch.randn(600, in_features, generator=g).to(dtype)
    for b in (None, bias):
        ref = batch_invariant.frozen_linear(x, weight, b)
        assert _rows_agree(lambda rows: batch_invariant.frozen_linear(rows, weight, b), x, ref) == []
        offset = batch_invariant.frozen_linear(x[7:40].contiguous(), weight, b)  # rows at another position
        assert torch.equal(offset, ref[7:40])
    exact = F.linear(x.double(), weight.double(), bias.double())  # sums of up to 1,536 unscaled products
    torch.testing.assert_close(ref.double(), exact, rtol=0, atol=0.5 if dtype == torch.bfloat16 else 1e-3)


@needs_dnn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_frozen_linear_gives_the_same_bits_on_one_thread_as_on_two(dtype):
    """The sampler runs small steps under `one_thread()`, the trainer large ones on every thread
    (`frozen_linear` itself takes one thread for a few rows by a small weight: not here)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with mock.patch.object(batch_invariant, "ONE_THREAD_MAX_ELEMENTS", 0):
            g = torch.Generator().manual_seed(5)
            weight, x = torch.randn(1536, 576, generator=g).to(dtype), torch.randn(300, 576, generator=g).to(dtype)
            for m in (1, 2, 5, 64, 300):
                two = batch_invariant.frozen_linear(x[:m], weight)
                with batch_invariant.one_thread():
                    one = batch_invariant.frozen_linear(x[:m], weight)
                assert torch.equal(one, two), m
    finally:
        torch.set_num_threads(saved)


@needs_dnn
def test_a_vocabulary_head_s_rows_do_not_depend_on_the_row_count():
    """SmolLM2's vocabulary head (49,152 x 576): the largest layer, few rows on every thread."""
    g = torch.Generator().manual_seed(8)
    weight, x = torch.randn(49152, 576, generator=g) / 24, torch.randn(64, 576, generator=g)
    ref = batch_invariant.frozen_linear(x, weight)
    assert [m for m in (1, 2, 3, 5, 12, 13, 33) if not torch.equal(batch_invariant.frozen_linear(x[:m], weight),
                                                                  ref[:m])] == []


@needs_dnn
def test_frozen_linear_input_gradients_do_not_depend_on_the_row_count():
    """Its backward (`grad @ weight`, oneDNN by the weight's transposed view) keeps a row's
    input gradient the same bits in a batch of any size, and equals F.linear's to rounding."""
    g = torch.Generator().manual_seed(9)
    weight, x = torch.randn(576, 1536, generator=g), torch.randn(64, 1536, generator=g)
    grad_out = torch.randn(64, 576, generator=g)

    def input_grad(m: int) -> torch.Tensor:
        rows = x[:m].clone().requires_grad_(True)
        (batch_invariant.frozen_linear(rows, weight) * grad_out[:m]).sum().backward()
        return rows.grad

    full = input_grad(64)
    assert [m for m in (1, 2, 3, 5, 12, 13, 40) if not torch.equal(input_grad(m), full[:m])] == []
    torch.testing.assert_close(full.double(), grad_out.double() @ weight.double(), rtol=0, atol=1e-3)


def test_a_weight_that_records_gradients_keeps_the_padded_mkl_route():
    """LoRA factors (trainable in the trainer, not in the sampler) must sum alike in both:
    `frozen_linear` takes oneDNN only for a weight that records no gradient (and small
    layers, where oneDNN's per-call cost does not pay, keep MKL too)."""
    g = torch.Generator().manual_seed(3)
    weight, small, x = torch.randn(576, 576, generator=g), torch.randn(16, 576, generator=g), \
        torch.randn(5, 576, generator=g)
    for w in (weight.clone().requires_grad_(True), small):
        with BatchInvariantMode():
            want = F.linear(x, w)
        assert torch.equal(batch_invariant.frozen_linear(x, w), want)


@needs_dnn
def test_frozen_base_mode_runs_a_module_s_linear_on_onednn():
    g = torch.Generator().manual_seed(4)
    layer = torch.nn.Linear(576, 576).requires_grad_(False)
    x = torch.randn(3, 576, generator=g)
    with batch_invariant.FrozenBaseMode():
        got = layer(x)
    assert torch.equal(got, batch_invariant.frozen_linear(x, layer.weight, layer.bias))


@needs_dnn
def test_the_fast_mode_s_frozen_linear_is_onednn_unpadded_and_close_to_mkl():
    """The fast mode's base layers take oneDNN too (faster from a dozen rows up on
    SmolLM2's layers), one row as one row; with gradients through the input as well."""
    g = torch.Generator().manual_seed(6)
    weight, x = torch.randn(1536, 576, generator=g), torch.randn(7, 576, generator=g)
    got = batch_invariant.frozen_linear(x, weight, invariant=False)
    lone = batch_invariant.frozen_linear(x[:1], weight, invariant=False)
    assert torch.equal(lone, torch.ops.mkldnn._linear_pointwise(x[:1], weight, None, "none", [], ""))  # not padded
    torch.testing.assert_close(got, F.linear(x, weight), rtol=1e-4, atol=1e-3)
    rows = x.clone().requires_grad_(True)
    batch_invariant.frozen_linear(rows, weight, invariant=False).sum().backward()
    torch.testing.assert_close(rows.grad.double(), torch.ones(7, 1536).double() @ weight.double(), rtol=0, atol=1e-3)
