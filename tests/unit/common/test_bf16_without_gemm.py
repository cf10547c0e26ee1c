"""A frozen bfloat16 layer on a CPU without a bfloat16 GEMM (`BF16_GEMM` False: no AVX-512,
where oneDNN builds no bfloat16 inner product and torch's falls back to a scalar loop)
computes in float32 from a float32 copy of its weight, kept on the weight. Forced here with
`BF16_GEMM` patched off, so these run on every host; the row-invariance scans of
test_batch_invariant.py cover this route on hosts that lack the GEMM."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from tunemesh_common.numerics import batch_invariant

BF16_ULP = 2.0**-7  # bfloat16 keeps 8 significant bits


@pytest.fixture(autouse=True)
def no_bf16_gemm():
    with mock.patch.object(batch_invariant, "BF16_GEMM", False):
        yield


def _layer(out_features: int, in_features: int, rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).bfloat16()
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    return weight, x


def _within_one_ulp(got: torch.Tensor, exact: torch.Tensor) -> bool:
    """bfloat16 `got` is `exact` (float64) rounded, give or take one unit in the last place
    (float32 accumulation can land a sum on the other side of a rounding boundary)."""
    return bool(((got.double() - exact).abs() <= exact.abs() * BF16_ULP + 1e-30).all())


@pytest.mark.parametrize("out_features,in_features", [(1536, 576), (8, 576)], ids=["onednn", "small"])
@pytest.mark.parametrize("invariant", [True, False], ids=["invariant", "fast"])
def test_outputs_and_input_gradients_are_the_exact_ones_rounded_to_bfloat16(out_features, in_features, invariant):
    weight, x = _layer(out_features, in_features, 24, out_features)
    rows = x.clone().requires_grad_(True)
    out = batch_invariant.frozen_linear(rows, weight, invariant=invariant)
    assert out.dtype == torch.bfloat16
    assert _within_one_ulp(out, x.double() @ weight.double().T)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    out.backward(grad_out)
    assert rows.grad.dtype == torch.bfloat16
    assert _within_one_ulp(rows.grad, grad_out.double() @ weight.double())


@pytest.mark.parametrize("out_features", [1536, 8], ids=["onednn", "small"])
def test_every_gemm_of_the_layer_runs_in_float32_both_ways(out_features):
    """No bfloat16 GEMM is called (torch's is the scalar loop): seen here for the forward
    of both routes and the backward of the oneDNN one (tunemesh's own); the small route's
    backward is autograd's, of the float32 GEMM its forward ran, seen in the graph."""
    weight, x = _layer(out_features, 576, 16, 3)
    dtypes = []
    real_dnn, real_mm = torch.ops.mkldnn._linear_pointwise, torch.Tensor.mm

    def dnn(a, w, *args):
        dtypes.append((a.dtype, w.dtype))
        return real_dnn(a, w, *args)

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.nn.functional.linear, torch.mm, torch.matmul, torch.addmm, real_mm):
                dtypes.append(tuple(a.dtype for a in args[:2]))
            return func(*args, **(kwargs or {}))

    rows = x.clone().requires_grad_(True)
    with mock.patch.object(torch.ops.mkldnn, "_linear_pointwise", dnn), Spy():
        out = batch_invariant.frozen_linear(rows, weight)
        forward_calls = len(dtypes)
        (gemm, _), = out.grad_fn.next_functions  # what the bfloat16 cast's gradient flows into
        small_backward = getattr(gemm, "_saved_mat2", None)
        out.float().sum().backward()
    assert forward_calls and all(d == (torch.float32, torch.float32) for d in dtypes), dtypes
    if out_features * 576 >= batch_invariant.DNN_MIN_WEIGHT and batch_invariant._DNN:
        assert len(dtypes) > forward_calls  # the backward's oneDNN call was seen too
    else:
        assert small_backward is not None and small_backward.dtype == torch.float32, type(gemm).__name__


def test_the_float32_copy_is_made_once_and_again_after_an_in_place_change():
    weight, x = _layer(1536, 576, 4, 5)
    first = batch_invariant.frozen_linear(x, weight)
    copy = batch_invariant.float32_copy(weight)
    assert batch_invariant.float32_copy(weight) is copy  # kept, not made per call
    assert torch.equal(copy, weight.float())
    with torch.no_grad():
        weight.mul_(2)  # e.g. a base swapped in place: the kept copy must not serve stale values
    again = batch_invariant.frozen_linear(x, weight)
    assert torch.equal(again, batch_invariant.frozen_linear(x, weight.clone()))
    assert not torch.equal(again, first)


def test_a_zero3_parameter_keeps_no_float32_copy():
    """DeepSpeed gathers a ZeRO-3 parameter per call: a kept copy would hold the whole weight."""
    weight, x = _layer(1536, 576, 4, 6)
    weight.ds_id = 7
    out = batch_invariant.frozen_linear(x, weight)
    assert not hasattr(weight, batch_invariant._FLOAT32_COPY)
    del weight.ds_id
    assert torch.equal(out, batch_invariant.frozen_linear(x, weight))


def test_a_float32_layer_and_a_host_with_the_gemm_keep_their_routes():
    weight, x = _layer(1536, 576, 4, 7)
    batch_invariant.frozen_linear(x.float(), weight.float())
    assert not hasattr(weight, batch_invariant._FLOAT32_COPY)
    if not batch_invariant._DNN:
        return
    with mock.patch.object(batch_invariant, "BF16_GEMM", True), \
            mock.patch.object(batch_invariant, "_onednn_linear") as onednn:  # not run: this host may lack it
        batch_invariant.frozen_linear(x, weight)
    assert onednn.call_args.args[0].dtype == torch.bfloat16  # the host's own bfloat16 kernel
    assert not hasattr(weight, batch_invariant._FLOAT32_COPY)
