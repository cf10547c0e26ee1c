"""Engine-side defensive validation: one ItemFailure per bad item, numpy only."""

from __future__ import annotations

import numpy as np
import pytest

from tunemesh.errors import Code
from tunemesh_trainer.domain import DatumArrays, EngineItem, ItemKind
from tunemesh_trainer.engine.validation import validate_item

LOSSES = {"cross_entropy"}  # the losses the engine under test runs


def _item(tokens, loss_inputs, loss_fn="cross_entropy", adapter="a"):
    datum = DatumArrays(tokens=np.asarray(tokens), loss_inputs={k: np.asarray(v) for k, v in loss_inputs.items()})
    return EngineItem("i", adapter, ItemKind.FORWARD_BACKWARD, [datum], loss_fn=loss_fn)


def _check(item):
    return validate_item(item, adapters={"a"}, losses=LOSSES, vocab_size=10, max_seq_len=4)


def test_valid_item_passes():
    assert _check(_item([1, 2, 3], {"target_tokens": [2, 3, 4], "weights": [1.0, -1.0, 0.5]})) is None
    assert _check(_item([1, 2], {"target_tokens": [[1, 2], [3, 4]], "weights": [[1.0, 0], [0, 1]]})) is None


@pytest.mark.parametrize(
    ("item", "code", "reason"),
    [
        (_item([1], {"target_tokens": [1]}, adapter="zz"), Code.NOT_FOUND, "ADAPTER_NOT_FOUND"),
        (_item([1], {"target_tokens": [1]}, loss_fn="nope"), Code.INVALID_ARGUMENT, "UNKNOWN_LOSS"),
        (_item([1, 10], {"target_tokens": [1, 2]}), Code.INVALID_ARGUMENT, "TOKEN_OUT_OF_RANGE"),
        (_item([1, -1], {"target_tokens": [1, 2]}), Code.INVALID_ARGUMENT, "TOKEN_OUT_OF_RANGE"),
        (_item([1, 2], {"target_tokens": [1, 10]}), Code.INVALID_ARGUMENT, "TOKEN_OUT_OF_RANGE"),
        (_item([1, 2], {"target_tokens": [1]}), Code.INVALID_ARGUMENT, "SHAPE_MISMATCH"),
        (_item([1, 2], {"target_tokens": [1, 2], "weights": [1.0]}), Code.INVALID_ARGUMENT, "SHAPE_MISMATCH"),
        (_item([[1, 2]], {"target_tokens": [1]}), Code.INVALID_ARGUMENT, "SHAPE_MISMATCH"),
        (_item([1, 2], {"weights": [1.0, 1.0]}), Code.INVALID_ARGUMENT, "MISSING_LOSS_INPUT"),
        (_item([1, 2], {"target_tokens": [1, 2], "advantages": [1.0, 1.0]}), Code.INVALID_ARGUMENT,
         "UNKNOWN_LOSS_INPUT"),
        (_item([1] * 5, {"target_tokens": [1] * 5}), Code.INVALID_ARGUMENT, "SEQUENCE_TOO_LONG"),
        (_item(np.zeros(0, np.int64), {"target_tokens": np.zeros(0, np.int64)}), Code.INVALID_ARGUMENT,
         "EMPTY_INPUT"),
        (_item([1.0, 2.0], {"target_tokens": [1, 2]}), Code.INVALID_ARGUMENT, "BAD_DTYPE"),
        (_item([1, 2], {"target_tokens": [1.0, 2.0]}), Code.INVALID_ARGUMENT, "BAD_DTYPE"),
        (_item([1, 2], {"target_tokens": [1, 2], "weights": [1, 1]}), Code.INVALID_ARGUMENT, "BAD_DTYPE"),
        (_item([1, 2], {"target_tokens": [1, 2], "weights": [1.0, np.nan]}), Code.INVALID_ARGUMENT,
         "NON_FINITE_INPUT"),
        (_item([1, 2], {"target_tokens": np.ones((2, 129), np.int64)}), Code.INVALID_ARGUMENT, "TOO_MANY_TARGETS"),
    ],
)
def test_bad_items_fail_with_reason(item, code, reason):
    failure = _check(item)
    assert failure is not None
    assert (failure.code, failure.reason) == (int(code), reason)


def test_empty_item_fails():
    item = EngineItem("i", "a", ItemKind.FORWARD, [])
    assert _check(item).reason == "EMPTY_DATA"


def test_the_failing_datum_and_input_are_named():
    good = DatumArrays(tokens=np.int64([1, 2]), loss_inputs={"target_tokens": np.int64([2, 3])})
    bad = DatumArrays(tokens=np.int64([1, 2]), loss_inputs={"target_tokens": np.int64([2, 3]),
                                                            "weights": np.float32([1.0, np.inf])})
    failure = _check(EngineItem("i", "a", ItemKind.FORWARD_BACKWARD, [good, bad], loss_fn="cross_entropy"))
    assert failure.reason == "NON_FINITE_INPUT"
    assert "data[1].loss_fn_inputs['weights']" in failure.message


def test_bad_loss_config_fails_with_its_reason():
    item = _item([1], {"target_tokens": [1]})
    item.loss_config = {"clip": 0.2}
    assert _check(item).reason == "UNKNOWN_LOSS_CONFIG"


def test_the_engine_names_its_losses_and_the_spec_gives_their_inputs():
    """Only the names come from the engine: a loss it runs is checked against its spec's
    inputs (ppo needs `logprobs` and `advantages`), one it does not run is UNKNOWN_LOSS."""
    ppo = _item([1, 2], {"target_tokens": [1, 2]}, loss_fn="ppo")
    runs_ppo = validate_item(ppo, adapters={"a"}, losses={"ppo"}, vocab_size=10, max_seq_len=4)
    assert runs_ppo is not None and runs_ppo.reason == "MISSING_LOSS_INPUT"
    assert _check(ppo).reason == "UNKNOWN_LOSS"
