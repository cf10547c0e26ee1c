"""datum_rules: each defect of one datum -> its REASON, the same from the rules themselves,
from the scheduler's check_data on protos and from the trainer's validate_item on arrays."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tunemesh import tensors
from tunemesh.errors import Code, InvalidArgumentError
from tunemesh.v1 import sessions_pb2, types_pb2
from tunemesh_common.training import datum_rules, loss_specs
from tunemesh_scheduler import validation
from tunemesh_trainer.domain import DatumArrays, EngineItem, ItemKind
from tunemesh_trainer.engine.validation import validate_item

VOCAB, MAX_LEN = 10, 4
MODEL = sessions_pb2.SupportedModel(name="m", family="dense", vocab_size=VOCAB, max_seq_len=MAX_LEN, max_lora_rank=8)
LIMITS = validation.Limits(max_datums=4, max_tokens=64)
K_MAX = datum_rules.MAX_TARGETS_PER_POSITION
RL = {"logprobs": np.float32([-1.0, -2.0]), "advantages": np.float32([0.5, -0.5])}


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad datum (for `loss_fn`), the reason it earns and a fragment its message names."""

    reason: str
    tokens: object
    inputs: dict
    loss_fn: str = "cross_entropy"
    names: str = ""
    on_wire: bool = True  # a Datum proto can carry it (its tokens are always 1-D integers)


def _targets(n: int) -> np.ndarray:
    return np.arange(1, n + 1, dtype=np.int64) % VOCAB


CASES = {
    "empty": Case(datum_rules.EMPTY_INPUT, np.zeros(0, np.int64), {"target_tokens": np.zeros(0, np.int64)}, names="model_input"),
    "too long": Case(datum_rules.SEQUENCE_TOO_LONG, [1] * (MAX_LEN + 1), {"target_tokens": _targets(MAX_LEN + 1)}),
    "token >= vocab": Case(datum_rules.TOKEN_OUT_OF_RANGE, [1, VOCAB], {"target_tokens": _targets(2)},
                           names="model_input: token 10 at position 1"),
    "token < 0": Case(datum_rules.TOKEN_OUT_OF_RANGE, [-1, 2], {"target_tokens": _targets(2)}, names="position 0"),
    "target >= vocab": Case(datum_rules.TOKEN_OUT_OF_RANGE, [1, 2], {"target_tokens": np.int64([1, VOCAB])},
                            names="target_tokens"),
    "2-D target < 0": Case(datum_rules.TOKEN_OUT_OF_RANGE, [1, 2], {"target_tokens": np.int64([[1, 2], [3, -4]])},
                           names="target_tokens"),
    "no targets": Case(datum_rules.MISSING_LOSS_INPUT, [1, 2], {"weights": np.float32([1, 1])},
                       names="target_tokens"),
    "no advantages": Case(datum_rules.MISSING_LOSS_INPUT, [1, 2],
                          {"target_tokens": _targets(2), "logprobs": RL["logprobs"]}, "ppo", names="advantages"),
    "unknown input": Case(datum_rules.UNKNOWN_LOSS_INPUT, [1, 2],
                          {"target_tokens": _targets(2), "advantages": RL["advantages"]}, names="advantages"),
    "short targets": Case(datum_rules.SHAPE_MISMATCH, [1, 2, 3], {"target_tokens": _targets(2)},
                          names="target_tokens"),
    "scalar targets": Case(datum_rules.SHAPE_MISMATCH, [1, 2], {"target_tokens": np.int64(1)}),
    "3-D targets": Case(datum_rules.SHAPE_MISMATCH, [1, 2], {"target_tokens": np.ones((2, 1, 1), np.int64)}),
    "weights unlike targets": Case(datum_rules.SHAPE_MISMATCH, [1, 2],
                                   {"target_tokens": np.int64([[1, 2], [3, 4]]), "weights": np.float32([1, 1])},
                                   names="weights"),
    "2-D tokens": Case(datum_rules.SHAPE_MISMATCH, [[1, 2]], {"target_tokens": _targets(1)}, on_wire=False),
    "K too large": Case(datum_rules.TOO_MANY_TARGETS, [1, 2], {"target_tokens": np.ones((2, K_MAX + 1), np.int64)}),
    "float targets": Case(datum_rules.BAD_DTYPE, [1, 2], {"target_tokens": np.float32([1, 2])}, names="target_tokens"),
    "integer weights": Case(datum_rules.BAD_DTYPE, [1, 2], {"target_tokens": _targets(2), "weights": np.int64([1, 1])},
                            names="weights"),
    "float tokens": Case(datum_rules.BAD_DTYPE, [1.0, 2.0], {"target_tokens": _targets(2)}, on_wire=False),
    "NaN weights": Case(datum_rules.NON_FINITE_INPUT, [1, 2],
                        {"target_tokens": _targets(2), "weights": np.float32([1, np.nan])}, names="weights"),
    "infinite advantages": Case(datum_rules.NON_FINITE_INPUT, [1, 2],
                                {"target_tokens": _targets(2), "logprobs": RL["logprobs"],
                                 "advantages": np.float32([np.inf, 1])}, "importance_sampling", names="advantages"),
}
ON_WIRE = {name: case for name, case in CASES.items() if case.on_wire}


def _check_rules(case: Case, where: str = "data[0]") -> int:
    inputs = {key: np.asarray(value) for key, value in case.inputs.items()}
    return datum_rules.check_datum(np.asarray(case.tokens), inputs, loss_specs.spec_of(case.loss_fn),
                                   vocab_size=VOCAB, max_seq_len=MAX_LEN, where=where)


def _proto(case: Case) -> types_pb2.Datum:
    datum = types_pb2.Datum()
    datum.model_input.chunks.add().encoded_text.tokens.extend(np.asarray(case.tokens).tolist())
    for key, value in case.inputs.items():
        datum.loss_fn_inputs[key].CopyFrom(tensors.encode(np.asarray(value)))
    return datum


def _engine_item(case: Case, data: list[DatumArrays] | None = None) -> EngineItem:
    datum = DatumArrays(tokens=np.asarray(case.tokens),
                        loss_inputs={key: np.asarray(value) for key, value in case.inputs.items()})
    return EngineItem("i", "a", ItemKind.FORWARD_BACKWARD, (data or []) + [datum], loss_fn=case.loss_fn)


def _validate(item: EngineItem):
    return validate_item(item, adapters={"a"}, losses=loss_specs.SPECS, vocab_size=VOCAB, max_seq_len=MAX_LEN)


@pytest.mark.parametrize("name", CASES)
def test_the_rules_refuse_each_defect_with_its_reason(name):
    case = CASES[name]
    with pytest.raises(InvalidArgumentError) as info:
        _check_rules(case)
    assert info.value.reason == case.reason
    assert "data[0]" in info.value.message and case.names in info.value.message


@pytest.mark.parametrize("name", ON_WIRE)
def test_the_scheduler_refuses_a_bad_proto_datum_with_the_same_reason(name):
    case = CASES[name]
    good = _proto(Case("", [1, 2], {"target_tokens": _targets(2)} | (RL if case.loss_fn != "cross_entropy" else {})))
    with pytest.raises(InvalidArgumentError) as info:
        validation.check_data([good, _proto(case)], case.loss_fn, MODEL, LIMITS)
    assert info.value.reason == case.reason
    assert "data[1]" in info.value.message and case.names in info.value.message


@pytest.mark.parametrize("name", CASES)
def test_the_trainer_fails_a_bad_item_with_the_same_reason(name):
    case = CASES[name]
    good = DatumArrays(tokens=np.int64([1, 2]), loss_inputs={"target_tokens": _targets(2)}
                       | (RL if case.loss_fn != "cross_entropy" else {}))
    failure = _validate(_engine_item(case, [good]))
    assert (failure.code, failure.reason) == (int(Code.INVALID_ARGUMENT), case.reason)
    assert "data[1]" in failure.message and case.names in failure.message


@pytest.mark.parametrize(
    ("tokens", "inputs", "loss_fn"),
    [
        ([1, 2, 3], {"target_tokens": _targets(3)}, "cross_entropy"),
        ([9] * MAX_LEN, {"target_tokens": _targets(MAX_LEN), "weights": np.float32([1, 0, -1, 0.5])}, "cross_entropy"),
        ([0, 9], {"target_tokens": np.int32([[0, 9], [9, 0]]), "weights": np.ones((2, 2), np.float32)}, "cross_entropy"),
        ([1, 2], {"target_tokens": np.ones((2, K_MAX), np.int64)}, "cross_entropy"),
        ([1, 2], {"target_tokens": _targets(2)} | RL, "dro"),
        ([1, 2], {"target_tokens": _targets(2), "weights": np.float32([0, 1])} | RL, "ppo"),
        ([1, 2], {"target_tokens": _targets(2), "sequence_ratio_mask": np.float32([0, 1])} | RL, "gspo"),
    ],
)
def test_a_valid_datum_passes_everywhere_and_counts_its_tokens(tokens, inputs, loss_fn):
    case = Case("", tokens, inputs, loss_fn)
    assert _check_rules(case) == len(tokens)
    assert validation.check_data([_proto(case)], loss_fn, MODEL, LIMITS) == len(tokens)
    assert _validate(_engine_item(case)) is None


def test_token_ids_are_checked_without_a_per_token_loop_and_name_the_first_bad_one():
    ids = np.arange(5000, dtype=np.int64) % VOCAB
    datum_rules.check_token_ids(ids, VOCAB, "ids")
    ids[[1234, 4000]] = [VOCAB + 3, -1]
    with pytest.raises(InvalidArgumentError, match="token 13 at position 1234") as info:
        datum_rules.check_token_ids(ids, VOCAB, "ids")
    assert info.value.reason == datum_rules.TOKEN_OUT_OF_RANGE
    datum_rules.check_token_ids(np.zeros(0, np.int64), VOCAB, "ids")  # nothing to refuse
