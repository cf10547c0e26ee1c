"""The rules one datum must follow, on numpy arrays, and the one REASON vocabulary for them.

The scheduler (on a request's decoded tensors, before queueing) and the trainer (on each
engine item, before compute) both call `check_datum`, so the same defect is refused with
the same reason on either side. Every failure is `InvalidArgumentError(REASON, message)`,
the message naming the datum and the input, e.g. `data[2].loss_fn_inputs['weights']`.

A datum is `tokens` (what the model reads) and named loss inputs (`target_tokens`,
`weights`, `logprobs`, `advantages`, as the loss's spec in `loss_specs` declares):

- tokens: 1-D integers, length in [1, max_seq_len], ids in [0, vocab_size);
- the loss's required inputs present, no input the loss does not take;
- each input (N,) or (N, K) with N the token count and K in [1, MAX_TARGETS_PER_POSITION],
  all of one shape (that of `target_tokens`);
- `target_tokens` integer ids in [0, vocab_size); every other input float and finite.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from tunemesh.errors import InvalidArgumentError
from tunemesh_common.training.loss_specs import INTEGER_INPUTS, LossSpec

EMPTY_DATA = "EMPTY_DATA"  # a request or item with no datum
UNSUPPORTED_CHUNK = "UNSUPPORTED_CHUNK"  # a model input chunk other than encoded_text
EMPTY_INPUT = "EMPTY_INPUT"  # a datum with no tokens
SEQUENCE_TOO_LONG = "SEQUENCE_TOO_LONG"  # more tokens than the model's max_seq_len
TOKEN_OUT_OF_RANGE = "TOKEN_OUT_OF_RANGE"  # a token or target id outside [0, vocab_size)
MISSING_LOSS_INPUT = "MISSING_LOSS_INPUT"  # the loss needs an input the datum lacks
UNKNOWN_LOSS_INPUT = "UNKNOWN_LOSS_INPUT"  # the datum has an input the loss does not take
SHAPE_MISMATCH = "SHAPE_MISMATCH"  # tokens not 1-D, or an input not shaped like the targets
TOO_MANY_TARGETS = "TOO_MANY_TARGETS"  # K of (N, K) inputs outside [1, MAX_TARGETS_PER_POSITION]
BAD_DTYPE = "BAD_DTYPE"  # tokens or target_tokens not integers, another input not floats
NON_FINITE_INPUT = "NON_FINITE_INPUT"  # NaN or infinity in a float input

MAX_TARGETS_PER_POSITION = 128  # K of (N, K) targets, e.g. top-k distillation


def check_datum(
    tokens: np.ndarray,
    inputs: Mapping[str, np.ndarray],
    spec: LossSpec,
    *,
    vocab_size: int,
    max_seq_len: int,
    where: str = "datum",
) -> int:
    """Check one datum for the loss `spec`; return its token count. `where` names it."""
    n = check_tokens(tokens, vocab_size=vocab_size, max_seq_len=max_seq_len, where=f"{where}.model_input")
    missing = [key for key in spec.required_inputs if key not in inputs]
    if missing:
        raise InvalidArgumentError(MISSING_LOSS_INPUT, f"{where}: {spec.name} needs loss_fn_inputs {missing}")
    accepted = set(spec.required_inputs) | set(spec.optional_inputs)
    unknown = sorted(set(inputs) - accepted)
    if unknown:
        raise InvalidArgumentError(
            UNKNOWN_LOSS_INPUT, f"{where}: {spec.name} does not take loss_fn_inputs {unknown} (accepted: {sorted(accepted)})"
        )
    _check_inputs(inputs, n, vocab_size, where)
    return n


def check_tokens(tokens: np.ndarray, *, vocab_size: int, max_seq_len: int, where: str) -> int:
    """A model input's token ids: 1-D integers, 1..max_seq_len of them, each in the vocabulary."""
    tokens = np.asarray(tokens)
    if tokens.dtype.kind not in "iu":
        raise InvalidArgumentError(BAD_DTYPE, f"{where}: token ids must be integers, got {tokens.dtype}")
    if tokens.ndim != 1:
        raise InvalidArgumentError(SHAPE_MISMATCH, f"{where}: token ids must be 1-D, got shape {list(tokens.shape)}")
    n = check_token_count(tokens.shape[0], max_seq_len=max_seq_len, where=where)
    check_token_ids(tokens, vocab_size, where)
    return n


def check_token_count(n: int, *, max_seq_len: int, where: str) -> int:
    """A model input's token count lies in [1, max_seq_len] (checkable from the protobuf
    lengths, before any token is copied)."""
    if n == 0:
        raise InvalidArgumentError(EMPTY_INPUT, f"{where} has no tokens")
    if n > max_seq_len:
        raise InvalidArgumentError(SEQUENCE_TOO_LONG, f"{where}: {n} tokens exceed the model's {max_seq_len}")
    return n


def check_token_ids(ids: np.ndarray, vocab_size: int, where: str) -> None:
    """Every id of an integer array lies in [0, vocab_size); the message names the first that does not."""
    if not ids.size or (int(ids.min()) >= 0 and int(ids.max()) < vocab_size):
        return
    flat = ids.reshape(-1)
    position = int(np.flatnonzero((flat < 0) | (flat >= vocab_size))[0])
    raise InvalidArgumentError(
        TOKEN_OUT_OF_RANGE, f"{where}: token {int(flat[position])} at position {position} is outside [0, {vocab_size})"
    )


def _check_inputs(inputs: Mapping[str, np.ndarray], n: int, vocab_size: int, where: str) -> None:
    shapes = {key: _check_input(np.asarray(value), key, n, vocab_size, f"{where}.loss_fn_inputs[{key!r}]")
              for key, value in inputs.items()}
    reference = "target_tokens" if "target_tokens" in shapes else next(iter(shapes), None)
    for key, shape in shapes.items():
        if shape != shapes[reference]:
            raise InvalidArgumentError(
                SHAPE_MISMATCH,
                f"{where}.loss_fn_inputs[{key!r}]: shape {list(shape)} != {reference} {list(shapes[reference])}",
            )


def check_input_shape(shape: Sequence[int], n: int, where: str) -> None:
    """A loss input's shape is (n,) or (n, K) with K in [1, MAX_TARGETS_PER_POSITION]
    (checkable from a wire tensor's shape, before its bytes are decoded)."""
    if len(shape) not in (1, 2) or shape[0] != n:
        raise InvalidArgumentError(
            SHAPE_MISMATCH, f"{where}: shape {list(shape)[:3]} must be ({n},) or ({n}, K) to match model_input"
        )
    if len(shape) == 2 and not 1 <= shape[1] <= MAX_TARGETS_PER_POSITION:
        raise InvalidArgumentError(
            TOO_MANY_TARGETS, f"{where}: K = {shape[1]} must lie in [1, {MAX_TARGETS_PER_POSITION}]"
        )


def _check_input(array: np.ndarray, key: str, n: int, vocab_size: int, where: str) -> tuple[int, ...]:
    check_input_shape(array.shape, n, where)
    if key in INTEGER_INPUTS:
        if array.dtype.kind not in "iu":
            raise InvalidArgumentError(BAD_DTYPE, f"{where}: must be an integer tensor, got {array.dtype}")
        check_token_ids(array, vocab_size, where)
    elif array.dtype.kind != "f":
        raise InvalidArgumentError(BAD_DTYPE, f"{where}: must be a float tensor, got {array.dtype}")
    elif not np.isfinite(array).all():
        raise InvalidArgumentError(NON_FINITE_INPUT, f"{where}: contains NaN or infinity")
    return array.shape
