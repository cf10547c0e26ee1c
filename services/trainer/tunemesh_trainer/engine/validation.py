"""Defensive per-item input checks, run before any compute (the scheduler checks first).

Each datum is checked by the same rules, with the same reasons, as the scheduler's
(`tunemesh_common.training.datum_rules`). A failing item gets an ItemFailure; the rest of its
batch runs.
"""

from __future__ import annotations

from collections.abc import Container

from tunemesh.errors import Code, InvalidArgumentError
from tunemesh_common.training import datum_rules, loss_specs
from tunemesh_trainer.domain import EngineItem, ItemFailure


def validate_item(
    item: EngineItem,
    *,
    adapters: Container[str],
    losses: Container[str],
    vocab_size: int,
    max_seq_len: int,
) -> ItemFailure | None:
    """Return why `item` cannot run, or None.

    `losses` names the loss functions this engine runs; the datum rules read each loss's
    inputs (required and optional) from its spec in `loss_specs`.
    """
    if item.adapter_id not in adapters:
        return ItemFailure(int(Code.NOT_FOUND), "ADAPTER_NOT_FOUND", f"no adapter {item.adapter_id!r}")
    try:
        _check_item(item, losses, vocab_size, max_seq_len)
    except InvalidArgumentError as err:
        return ItemFailure(int(err.rpc_code), err.reason, err.message)
    return None


def _check_item(item: EngineItem, losses: Container[str], vocab_size: int, max_seq_len: int) -> None:
    if item.loss_fn not in losses:
        raise InvalidArgumentError("UNKNOWN_LOSS", f"this engine does not run loss function {item.loss_fn!r}")
    spec = loss_specs.spec_of(item.loss_fn)
    spec.resolve_config(item.loss_config)
    if not item.data:
        raise InvalidArgumentError(datum_rules.EMPTY_DATA, "an item needs at least one datum")
    for index, datum in enumerate(item.data):
        datum_rules.check_datum(datum.tokens, datum.loss_inputs, spec, vocab_size=vocab_size,
                                max_seq_len=max_seq_len, where=f"data[{index}]")
