"""Attention masked by position, for right-padded batches and row-aligned KV caches.

Both engines lay every row out from position 0: the trainer right-pads its rows, and the
sampler's cache keeps each row's keys at indices 0..n-1 and writes a row's next token at
its own length. So a query at position p may attend to key index j exactly when j <= p,
whatever its row shares the batch with: the mask comes from the queries' `position_ids`
alone (transformers builds none: `MASK` below answers None).

Two implementations are registered with transformers' AttentionInterface:

- `POSITIONAL`: torch's SDPA with that mask (float32 on a bfloat16 base on CPU, where
  torch's bfloat16 CPU attention is slow). Fast; its sums over key positions depend on the
  batch (kernel splits follow the sequence lengths).
- `INVARIANT`: a query's result depends on its own keys only, so a decode step, a prefill
  and a training pass give it the same bits. The key axis is padded with zeros to whole
  blocks of `KV_BLOCK` positions (the BLAS picks other kernels for a handful of columns).
  Scores are one matmul per KV head over that head's query rows (grouped-query heads
  together); softmax runs over the whole key axis
  (masked keys are -inf, and torch's softmax was measured invariant to a masked tail); the
  weighted sum of values is taken per block of `KV_BLOCK` key positions, each block a
  matmul of fixed length, and the blocks are added one after another in position order. A
  block past a query's position adds exact zeros. Runs in float32 whatever the base dtype.
  Its backward (`_InvariantCore`) is written out the same way, so a row's gradients do not
  depend on its batch either: sums over key positions go by KV_BLOCK blocks, sums over
  query rows (the keys' and values' gradients) by blocks of `Q_BLOCK` positions of each
  query head, in order; the rows of padding positions carry exact zeros.
  Every matmul gets contiguous operands: torch passes a strided view to the BLAS as is or
  copies it depending on the batch size (whether the batch axes fold into one), and the
  BLAS sums differently over the two layouts. Its matmuls are batch_invariant.py's padded
  ones, so they never see too few rows.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn

from tunemesh_common.numerics.batch_invariant import matmul, one_thread_if

POSITIONAL = "tunemesh_positional"
INVARIANT = "tunemesh_invariant"
KV_BLOCK = 64  # key positions per block of the invariant sums over keys
Q_BLOCK = 64  # query positions per block of the invariant backward's sums over queries
ONE_THREAD_SCORES = 1 << 14  # attention without gradients over at most this many scores: one thread
SCRATCH_MAX_ELEMENTS = 16 << 20  # a padded key or value tensor up to 64 MiB (float32) reuses its buffer


def _threads(query: torch.Tensor, kv_len: int) -> contextlib.AbstractContextManager:
    """One thread for a small attention that records no gradient (a decode step): its dozen
    small operations then wake no other thread. The same numbers either way: its batched
    matmuls run one thread per matrix, and the rest is elementwise or row-wise."""
    return one_thread_if(not torch.is_grad_enabled() and query.shape[:-1].numel() * kv_len <= ONE_THREAD_SCORES)


def _allowed(position_ids: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """(B or 1, q_len, kv_len): key j is visible to a query at position p iff j <= p."""
    if position_ids is None:
        position_ids = torch.arange(q_len, device=device)[None]
    return torch.arange(kv_len, device=device)[None, None, :] <= position_ids[:, :, None]


class _GroupedMask(threading.local):
    """The invariant attention's mask, (B or 1, 1, group * q_len, kv_len), kept from one layer
    to the next: every layer of a forward gets the same `position_ids` tensor and key length."""

    key: tuple | None = None
    mask: torch.Tensor | None = None

    def get(self, position_ids: torch.Tensor | None, q_len: int, kv_len: int, group: int,
            device: torch.device) -> torch.Tensor:
        # the tensor itself is kept (so no other can take its id), and compared by identity
        # and version (an in-place change bumps it)
        key = (None if position_ids is None else position_ids._version, q_len, kv_len, group, device)
        if self.key is None or self.key[0] is not position_ids or self.key[1:] != key:
            allowed = _allowed(position_ids, q_len, kv_len, device)
            self.mask = allowed[:, None, None].expand(-1, 1, group, -1, -1).reshape(
                allowed.shape[0], 1, group * q_len, kv_len)
            self.key = (position_ids, *key)
        return self.mask


_GROUPED_MASK = _GroupedMask()


def positional_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, position_ids=None,
                         **kwargs):
    """SDPA under the position mask; (B, Lq, Hq, D) like transformers' attention functions."""
    upcast = query.dtype == torch.bfloat16 and query.device.type == "cpu"
    with _threads(query, key.shape[2]):
        q, k, v = (t.float() for t in (query, key, value)) if upcast else (query, key, value)
        allowed = _allowed(position_ids, query.shape[2], key.shape[2], query.device)[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
        return out.to(query.dtype).transpose(1, 2).contiguous(), None


def invariant_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, position_ids=None,
                        **kwargs):
    """The batch-invariant attention of the module docstring; (B, Lq, Hq, D)."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    kv_len = key.shape[2] + -key.shape[2] % KV_BLOCK
    with _threads(query, kv_len):
        key_t = _padded(key.transpose(-1, -2), kv_len, -1, "keys")
        value = _padded(value, kv_len, -2, "values")
        q = query.float().reshape(batch, kv_heads, group * q_len, dim).contiguous()  # query head h = kv * group + g
        scale = dim ** -0.5 if scaling is None else scaling
        allowed = _GROUPED_MASK.get(position_ids, q_len, kv_len, group, query.device)
        out = _InvariantCore.apply(q, key_t, value, allowed, scale, group)
        out = out.reshape(batch, q_heads, q_len, dim).transpose(1, 2).contiguous()
        return out.to(query.dtype), None


class _Scratch(threading.local):
    """Buffers this thread reuses from one layer to the next where no gradient is recorded
    (nothing keeps them past the layer): a decode step of 64 rows otherwise allocated, and
    page-faulted in, ~12 MB of fresh memory per layer. A larger tensor (a long prefill)
    gets fresh memory, so the buffers stay small."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def take(self, name: str, shape: list[int], device: torch.device) -> torch.Tensor:
        size = 1
        for n in shape:
            size *= n
        if size > SCRATCH_MAX_ELEMENTS:
            return torch.empty(shape, dtype=torch.float32, device=device)
        buffer = self.buffers.get((name, device))
        if buffer is None or buffer.numel() < size:
            buffer = self.buffers[(name, device)] = torch.empty(size, dtype=torch.float32, device=device)
        return buffer[:size].view(shape)


_SCRATCH = _Scratch()


def _padded(tensor: torch.Tensor, length: int, axis: int, name: str) -> torch.Tensor:
    """`tensor` in float32, contiguous, with zeros after it along `axis` up to `length`: one
    copy, into this thread's `name` buffer where no gradient is recorded."""
    shape = list(tensor.shape)
    shape[axis] = length
    if torch.is_grad_enabled():  # the backward keeps it
        out = torch.empty(shape, dtype=torch.float32, device=tensor.device)
    else:
        out = _SCRATCH.take(name, shape, tensor.device)
    filled = tensor.shape[axis]
    out.narrow(axis, 0, filled).copy_(tensor)
    out.narrow(axis, filled, length - filled).zero_()
    return out


def _blocked_values(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """probs (B, H, M, L) @ values (B, H, L, D), summed over L (whole KV_BLOCKs) block by block in order."""
    batch, heads, rows, length = probs.shape
    blocks = length // KV_BLOCK
    probs = probs.reshape(batch, heads, rows, blocks, KV_BLOCK).transpose(2, 3).contiguous()
    partial = matmul(probs, values.reshape(batch, heads, blocks, KV_BLOCK, values.shape[-1]).contiguous())
    out = partial[:, :, 0]
    for block in range(1, blocks):
        out = out + partial[:, :, block]
    return out


class _InvariantCore(torch.autograd.Function):
    """softmax(q k^T * scale, masked) v for q (B, H, group * Lq, D) (rows: query head, then
    position), k^T (B, H, D, L) and v (B, H, L, D), all contiguous, L whole KV_BLOCKs; every
    sum in a fixed order."""

    @staticmethod
    def forward(ctx, q, k_t, v, allowed, scale: float, group: int):
        scores = matmul(q, k_t) * scale
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        ctx.save_for_backward(q, k_t, v, probs)
        ctx.scale, ctx.group = scale, group
        return _blocked_values(probs, v)

    @staticmethod
    def backward(ctx, grad_out):
        q, k_t, v, probs = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_probs = matmul(grad_out, v.transpose(-1, -2).contiguous())
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True)) * ctx.scale
        grad_q = _blocked_values(grad_scores, k_t.transpose(-1, -2))
        grad_k_t = _blocked_over_queries(grad_scores, q, ctx.group).transpose(-1, -2)
        grad_v = _blocked_over_queries(probs, grad_out, ctx.group)
        return grad_q, grad_k_t, grad_v, None, None, None


def _blocked_over_queries(weights: torch.Tensor, rows: torch.Tensor, group: int) -> torch.Tensor:
    """weights (B, H, M, L)^T @ rows (B, H, M, X) -> (B, H, L, X), the sum over the M = group x
    Lq query rows taken by Q_BLOCK positions of each query head, one block after another."""
    batch, heads, m, length = weights.shape
    q_len = m // group
    missing = -q_len % Q_BLOCK
    weights = F.pad(weights.reshape(batch, heads, group, q_len, length), (0, 0, 0, missing))
    rows = F.pad(rows.reshape(batch, heads, group, q_len, rows.shape[-1]), (0, 0, 0, missing))
    blocks = (q_len + missing) // Q_BLOCK
    weights = weights.reshape(batch, heads, group * blocks, Q_BLOCK, length).transpose(-1, -2).contiguous()
    partial = matmul(weights, rows.reshape(batch, heads, group * blocks, Q_BLOCK, rows.shape[-1]).contiguous())
    out = partial[:, :, 0]
    for block in range(1, group * blocks):
        out = out + partial[:, :, block]
    return out


def _no_mask(*args, **kwargs) -> None:
    return None


def use_attention(model: nn.Module, implementation: str) -> None:
    """Make `model` (a transformers model) run `implementation` (POSITIONAL or INVARIANT)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    functions = {POSITIONAL: positional_attention, INVARIANT: invariant_attention}
    AttentionInterface.register(implementation, functions[implementation])
    AttentionMaskInterface.register(implementation, _no_mask)
    model.config._attn_implementation = implementation
