"""Defensive per-item input checks, run before any compute (the scheduler checks first).

A failing item gets an ItemFailure; the rest of its batch runs.
"""

from __future__ import annotations

from collections.abc import Container, Mapping

import numpy as np

from tunemesh_common.errors import Code, InvalidArgument
from tunemesh_common.loss_specs import SPECS
from tunemesh_trainer.domain import DatumArrays, EngineItem, ItemFailure


def _invalid(reason: str, message: str) -> ItemFailure:
    return ItemFailure(code=int(Code.INVALID_ARGUMENT), reason=reason, message=message)


def validate_item(
    item: EngineItem,
    *,
    adapters: Container[str],
    required_inputs: Mapping[str, tuple[str, ...]],
    vocab_size: int,
    max_seq_len: int,
) -> ItemFailure | None:
    """Return why `item` cannot run, or None. `required_inputs` maps loss name -> inputs."""
    if item.adapter_id not in adapters:
        message = f"no adapter {item.adapter_id!r}"
        return ItemFailure(int(Code.NOT_FOUND), "ADAPTER_NOT_FOUND", message)
    if item.loss_fn not in required_inputs or item.loss_fn not in SPECS:
        return _invalid("UNKNOWN_LOSS", f"unknown loss function {item.loss_fn!r}")
    try:
        SPECS[item.loss_fn].resolve_config(item.loss_config)
    except InvalidArgument as err:
        return _invalid(err.reason, err.message)
    if not item.data:
        return _invalid("EMPTY_DATA", "an item needs at least one datum")
    for index, datum in enumerate(item.data):
        failure = _validate_datum(datum, required_inputs[item.loss_fn], vocab_size, max_seq_len)
        if failure is not None:
            failure.message = f"datum {index}: {failure.message}"
            return failure
    return None


def _validate_datum(
    datum: DatumArrays, required: tuple[str, ...], vocab_size: int, max_seq_len: int
) -> ItemFailure | None:
    tokens = np.asarray(datum.tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        return _invalid("BAD_TOKENS", f"tokens must be 1-D integers, got {tokens.dtype}{tokens.shape}")
    n = tokens.shape[0]
    if not 1 <= n <= max_seq_len:
        return _invalid("BAD_SEQUENCE_LENGTH", f"length {n} outside [1, {max_seq_len}]")
    if _out_of_range(tokens, vocab_size):
        return _invalid("TOKEN_OUT_OF_RANGE", f"token ids must lie in [0, {vocab_size})")
    for key in required:
        if key not in datum.loss_inputs:
            return _invalid("MISSING_LOSS_INPUT", f"loss input {key!r} is missing")
    return _validate_inputs(datum.loss_inputs, n, vocab_size)


def _validate_inputs(
    inputs: Mapping[str, np.ndarray], n: int, vocab_size: int
) -> ItemFailure | None:
    targets = inputs.get("target_tokens")
    target_shape = None
    if targets is not None:
        targets = np.asarray(targets)
        if not np.issubdtype(targets.dtype, np.integer) or targets.ndim not in (1, 2):
            return _invalid("BAD_LOSS_INPUT", "target_tokens must be an integer (N,) or (N, K) array")
        if _out_of_range(targets, vocab_size):
            return _invalid("TOKEN_OUT_OF_RANGE", f"target ids must lie in [0, {vocab_size})")
        target_shape = targets.shape
    for key, value in inputs.items():
        value = np.asarray(value)
        if value.dtype.kind not in "iuf" or value.ndim == 0 or value.shape[0] != n:
            return _invalid(
                "LENGTH_MISMATCH", f"loss input {key!r} has shape {value.shape}, tokens ({n},)"
            )
        if target_shape is not None and value.shape != target_shape:
            return _invalid(
                "LENGTH_MISMATCH", f"loss input {key!r} has shape {value.shape}, targets {target_shape}"
            )
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return _invalid("NON_FINITE_INPUT", f"loss input {key!r} contains NaN or infinity")
    return None


def _out_of_range(ids: np.ndarray, vocab_size: int) -> bool:
    return bool(ids.size) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size)
