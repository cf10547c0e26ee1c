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
A GEMM under the threshold whose matrix is small runs instead on one thread, padded to 4
rows: measured, one thread at M >= 4 sums every row as two threads at M >= 12 do, and a
4-row GEMM on one thread costs a third of a 12-row one on two (no second thread to wake,
a third of the rows). That needs MKL's and OpenMP's per-thread thread counts
(`MKL_Set_Num_Threads_Local`, `omp_set_num_threads`), which leave the process-wide count
(and every other thread's GEMMs) alone; where torch's build lacks them, the padding to the
many-thread threshold stays.
Row-wise reductions (RMSNorm's mean, softmax, log_softmax) were measured invariant to the
number of rows and to a masked tail as they are; attention's sum over key positions is not
(its length changes with the batch): see `attention.py`.

A frozen base linear (`FrozenBaseMode`, which the LoRA wrappers put around their base
layer, in both modes) runs on oneDNN instead (`torch.ops.mkldnn._linear_pointwise`, the
kernel torch already uses for bfloat16 linears) when its weight is large enough for
oneDNN's per-call cost to pay: measured on this project's hosts, it sums a row the same
way for every M >= 2, on one thread as on two, in float32 and bfloat16, so a lone row is
padded to 2 rows only; and in float32 it ran 1.7-2.3x faster than MKL's GEMM on SmolLM2's
layers from 12 rows up, 2.5-4x on its vocabulary head. Its gradient with respect to the
input is oneDNN's too (by the weight's transposed view); a frozen weight needs none.
oneDNN builds no bfloat16 inner product on CPUs without AVX-512 (AVX2-only hosts), and
torch's own bfloat16 GEMM there is a scalar loop (measured: 17 s for the input gradient of
SmolLM2's vocabulary head over 256 rows, 0.2 s in float32). There a bfloat16 frozen layer
computes in float32 instead, from a float32 copy of its weight kept on the weight (exact:
a bfloat16 value is a float32 one), and rounds its output to bfloat16 once, as a bfloat16
GEMM with float32 accumulation does; both ways, on oneDNN for large weights and the padded
`linear` for small ones, so the row invariance above holds. It costs the copy's memory
(twice the bfloat16 weights) and runs at float32 speed.
LoRA factors keep MKL everywhere: the trainer's, whose factors record gradients, and the
sampler's batched ones must sum alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

ONE_THREAD_ROWS = 4  # one thread, or one GEMM of a batched matmul of several matrices
ONE_THREAD_MAX_ELEMENTS = 1 << 22  # a matrix up to this size: a small GEMM runs on one thread


def gemm_rows() -> int:
    """The fewest rows a 2-D GEMM on all of torch's threads needs for its row results to be
    the same as in any larger GEMM: 4 with one thread, 12 with two (measured: MKL hands rows
    out 8 at a time, and each thread's share must be 4 or more)."""
    return 8 * max(1, torch.get_num_threads()) - 4


def batched_gemm_rows(matrices: int) -> int:
    """The fewest rows per matrix a batched matmul of `matrices` matrices needs (a batch of
    small GEMMs under `gemm_rows()` rows runs on one thread where it can)."""
    return ONE_THREAD_ROWS if matrices > 1 or _THREAD_LOCAL is not None else gemm_rows()


def _thread_local_counts() -> tuple[Callable[[int], int], Callable[[int], None], Callable[[], int]] | None:
    """MKL's and OpenMP's per-thread thread-count setters from torch's own library, or
    None where this build of torch lacks them."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        mkl_local = lib.MKL_Set_Num_Threads_Local  # the C spelling crashes in torch's static MKL
        omp_set, omp_get = lib.omp_set_num_threads, lib.omp_get_max_threads
    except (OSError, AttributeError):
        return None
    mkl_local.argtypes, mkl_local.restype = [ctypes.c_int], ctypes.c_int
    omp_set.argtypes, omp_set.restype = [ctypes.c_int], None
    omp_get.argtypes, omp_get.restype = [], ctypes.c_int
    return mkl_local, omp_set, omp_get


_THREAD_LOCAL = _thread_local_counts() if torch.backends.mkl.is_available() else None
PER_THREAD_COUNTS = _THREAD_LOCAL is not None  # whether one_thread() limits this thread alone


def one_thread() -> contextlib.AbstractContextManager:
    """torch's kernels called from this thread run on one thread (no parallel region, so no
    other thread to wake: with OMP_WAIT_POLICY=PASSIVE, which the local mesh sets, waking
    one cost ~50 us per small operation); other threads' are untouched. A no-op where this
    build of torch lacks per-thread thread counts."""
    return thread_count(1)


@contextlib.contextmanager
def thread_count(count: int) -> Iterator[None]:
    """torch's kernels called from this thread run on `count` threads (MKL's and OpenMP's
    per-thread counts); other threads' are untouched. A no-op where this build of torch
    lacks per-thread thread counts."""
    if _THREAD_LOCAL is None:
        yield
        return
    mkl_local, omp_set, omp_get = _THREAD_LOCAL
    # ATen sets a thread's OpenMP count to the process-wide one on the thread's first parallel
    # operation, which would undo ours in a fresh thread (a trainer's lane): let it do so first
    torch.get_num_threads()
    saved_omp, saved_mkl = omp_get(), mkl_local(count)
    omp_set(count)
    try:
        yield
    finally:
        omp_set(saved_omp)
        mkl_local(saved_mkl)


def one_thread_if(small: bool) -> contextlib.AbstractContextManager:
    """`one_thread()` for work judged `small` by the caller, else torch's threads."""
    return one_thread() if small else contextlib.nullcontext()


def _padded_call(func: Callable, rows: int, rows_of: torch.Tensor, matrix: torch.Tensor,
                 pad: Callable[[int], tuple]):
    """`func(*pad(n))` with the fewest padded rows n that keep `rows` rows (of `rows_of`)
    invariant: on one thread where `matrix` is small enough for that to pay and no gradient
    is recorded (autograd's backward GEMMs run on every thread, with the forward's rows)."""
    need = gemm_rows()
    if (need > ONE_THREAD_ROWS and _THREAD_LOCAL is not None and matrix.numel() <= ONE_THREAD_MAX_ELEMENTS
            and not (torch.is_grad_enabled() and (rows_of.requires_grad or matrix.requires_grad))):
        with one_thread():
            return func(*pad(max(rows, ONE_THREAD_ROWS)))
    return func(*pad(need))


def _pad_rows(x: torch.Tensor, rows: int, axis: int) -> torch.Tensor:
    """`x` with zero rows appended along `axis` up to `rows`."""
    if x.shape[axis] >= rows:
        return x
    shape = list(x.shape)
    shape[axis] = rows - x.shape[axis]
    return torch.cat([x, x.new_zeros(shape)], dim=axis)


def _flat_rows(func: Callable, x: torch.Tensor, *rest, **kwargs) -> torch.Tensor:
    """`func(x, *rest)` for a function that multiplies every row of `x` (all but its last
    axis) by one matrix, with few rows padded (`_padded_call`)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    need = gemm_rows()
    x = x.contiguous()  # a strided input reaches the BLAS copied or not depending on its shape
    if rows == 0 or rows >= need:
        return func(x, *rest, **kwargs)
    flat = x.reshape(rows, x.shape[-1])
    out = _padded_call(lambda *args: func(*args, **kwargs), rows, flat, rest[0],
                       lambda n: (_pad_rows(flat, n, 0), *rest))
    return out[:rows].reshape(*x.shape[:-1], out.shape[-1])


def _linear(func, input, weight, bias=None):
    return _flat_rows(func, input, weight, bias) if input.dim() >= 1 else func(input, weight, bias)


def _matmul(func, a, b, **kwargs):
    if a.dim() < 2 or b.dim() < 2:
        return func(a, b, **kwargs)
    if b.dim() == 2:  # one matrix for every row of `a`: torch folds the rows into one GEMM
        return _flat_rows(func, a, b, **kwargs)
    rows, matrices = a.shape[-2], max(a.shape[:-2].numel(), b.shape[:-2].numel())
    need = ONE_THREAD_ROWS if matrices > 1 else gemm_rows()
    if rows == 0 or rows >= need:
        return func(a, b, **kwargs)
    if matrices > 1:
        return func(_pad_rows(a, need, -2), b, **kwargs)[..., :rows, :]
    return _padded_call(lambda *args: func(*args, **kwargs), rows, a, b,
                        lambda n: (_pad_rows(a, n, -2), b))[..., :rows, :]


def _mm(func, a, b, **kwargs):
    return _flat_rows(func, a, b, **kwargs)


def _addmm(func, input, mat1, mat2, **kwargs):
    rows, need = mat1.shape[0], gemm_rows()
    if rows == 0 or rows >= need:
        return func(input, mat1, mat2, **kwargs)

    def pad(n: int) -> tuple:
        full = _pad_rows(input, n, 0) if input.dim() == 2 and input.shape[0] == rows else input
        return full, _pad_rows(mat1, n, 0), mat2

    return _padded_call(lambda *args: func(*args, **kwargs), rows, mat1, mat2, pad)[:rows]


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


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, padded as under `BatchInvariantMode` (without a mode's per-call dispatch,
    which every other torch call under a mode pays too)."""
    return _linear(F.linear, input, weight, bias)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`torch.matmul`, padded as under `BatchInvariantMode`."""
    return _matmul(torch.matmul, a, b)


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`torch.bmm`, padded as under `BatchInvariantMode`."""
    return _matmul(torch.bmm, a, b)


class BatchInvariantMode(TorchFunctionMode):
    """While active (on this thread), the matmuls above never run below their row thresholds."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        padded = _PADDED.get(func)
        if padded is None:
            return func(*args, **(kwargs or {}))
        return padded(func, *args, **(kwargs or {}))


DNN_ROWS = 2  # oneDNN's linear sums a row alike for every M >= 2 (M = 1 takes a GEMV)
DNN_MIN_WEIGHT = 100_000  # elements: each oneDNN call costs ~11 us more than MKL's, which pays on larger layers
_DNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# a fast bfloat16 GEMM: oneDNN's, on CPUs with AVX-512 (without, oneDNN refuses to build one
# and torch's fallback is a scalar loop): elsewhere bfloat16 frozen layers compute in float32
BF16_GEMM = _DNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
_FLOAT32_COPY = "_tunemesh_float32"  # attribute of a bfloat16 frozen weight: (its version, its float32 copy)


def frozen_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  invariant: bool = True) -> torch.Tensor:
    """`F.linear` by a frozen weight on oneDNN where it applies (a CPU tensor of float32, or
    of bfloat16 where BF16_GEMM, a weight of DNN_MIN_WEIGHT elements or more, weight and
    bias recording no gradient), else MKL's; a frozen bfloat16 layer without BF16_GEMM
    computes in float32 (`_widened_linear`). `invariant`: batch-invariant (at least
    DNN_ROWS rows on oneDNN, the padded `linear` otherwise); which kernel a layer takes
    depends on its weight only, never on the rows."""
    frozen = (input.device.type == "cpu" and weight.dtype == input.dtype and weight.dim() == 2
              and not weight.requires_grad and input.dim() >= 1
              and (bias is None or (not bias.requires_grad and bias.dtype == input.dtype)))
    if frozen and input.dtype == torch.bfloat16 and not BF16_GEMM:
        return _widened_linear(input, weight, bias, invariant)
    if not (frozen and _DNN and input.dtype in (torch.float32, torch.bfloat16) and weight.numel() >= DNN_MIN_WEIGHT):
        return linear(input, weight, bias) if invariant else F.linear(input, weight, bias)
    return _onednn_linear(input, weight.contiguous(), bias, invariant)


def _onednn_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   invariant: bool) -> torch.Tensor:
    if torch.is_grad_enabled() and input.requires_grad:
        return _DnnLinear.apply(input, weight, bias, invariant)
    return _dnn_linear(input, weight, bias, DNN_ROWS if invariant else 1)


def _widened_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    invariant: bool) -> torch.Tensor:
    """A frozen bfloat16 layer in float32 (its input and weight widened exactly, its output
    rounded to bfloat16 once; its input gradient likewise, through autograd's casts)."""
    x, weight32 = input.float(), float32_copy(weight)
    bias32 = None if bias is None else bias.float()
    if _DNN and weight.numel() >= DNN_MIN_WEIGHT:
        out = _onednn_linear(x, weight32, bias32, invariant)
    else:
        out = linear(x, weight32, bias32) if invariant else F.linear(x, weight32, bias32)
    return out.to(input.dtype)


def float32_copy(weight: torch.Tensor) -> torch.Tensor:
    """`weight` as a contiguous float32 tensor, made once and kept on the weight (made again
    if the weight is changed in place); a DeepSpeed ZeRO-3 parameter, gathered per call,
    keeps none (that would undo its partitioning)."""
    if hasattr(weight, "ds_id"):
        return weight.detach().float().contiguous()
    version = (weight.data_ptr(), weight._version)
    kept = getattr(weight, _FLOAT32_COPY, None)
    if kept is None or kept[0] != version:
        kept = (version, weight.detach().float().contiguous())
        setattr(weight, _FLOAT32_COPY, kept)
    return kept[1]


def _dnn_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, min_rows: int) -> torch.Tensor:
    """`input @ weight.T` on oneDNN, `weight` as laid out (a transposed view is read in place,
    which the backward uses). A few rows by a small enough weight, where no gradient is
    recorded (sampling, a trainer's `forward`, and the calls inside `_DnnLinear`, which run
    with gradients off), run on one thread: the same bits as on every thread (measured and
    tested), and no second thread to wake."""
    rows = input.numel() // input.shape[-1] if input.shape[-1] else 0
    x = input.contiguous().reshape(rows, input.shape[-1])
    few = (rows < gemm_rows() and weight.numel() <= ONE_THREAD_MAX_ELEMENTS
           and not (torch.is_grad_enabled() and input.requires_grad))
    with one_thread_if(few):
        out = torch.ops.mkldnn._linear_pointwise(_pad_rows(x, min_rows, 0), weight, bias, "none", [], "")
    return out[:rows].reshape(*input.shape[:-1], weight.shape[0])


class _DnnLinear(torch.autograd.Function):
    """oneDNN both ways: the input's gradient `grad @ weight` is oneDNN's linear by the
    weight's transposed view (read in place, no copy; the same row invariance, measured;
    2.2-2.4x MKL's speed on SmolLM2's layers)."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                invariant: bool) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.min_rows = DNN_ROWS if invariant else 1
        return _dnn_linear(input, weight.contiguous(), bias, ctx.min_rows)

    @staticmethod
    @torch.autograd.function.once_differentiable  # oneDNN's linear has no derivative of its own
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return _dnn_linear(grad_out, weight.t(), None, ctx.min_rows), None, None, None


class FrozenBaseMode(BatchInvariantMode):
    """For a frozen base layer called through its module (so DeepSpeed's ZeRO-3 hooks still
    gather its weight): `F.linear` is `frozen_linear`; with `invariant`, the other matmuls
    are padded as under BatchInvariantMode, else left alone."""

    def __init__(self, invariant: bool = True) -> None:
        super().__init__()
        self._invariant = invariant

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            return frozen_linear(*args, **(kwargs or {}), invariant=self._invariant)
        if self._invariant:
            return super().__torch_function__(func, types, args, kwargs)
        return func(*args, **(kwargs or {}))
