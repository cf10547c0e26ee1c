"""tunemesh_trainer.convert: proto <-> domain conversion of the trainer."""

from __future__ import annotations

import numpy as np
import pytest

from tunemesh_internal.v1 import trainer_pb2
from tunemesh.v1 import types_pb2
from tunemesh import tensors
from tunemesh.errors import InvalidArgumentError
from tunemesh_trainer import convert
from tunemesh_trainer.domain import AdamSpec, ItemFailure, ItemKind, ItemOutcome, LoraSpec, ModelInfo


def test_lora_defaults_rank_zero_is_32_and_alpha_zero_is_rank():
    spec = convert.lora_spec(types_pb2.LoraConfig(train_attn=True))
    assert spec == LoraSpec(rank=32, alpha=32.0, train_attn=True, train_mlp=False, train_unembed=False, seed=0)
    spec = convert.lora_spec(types_pb2.LoraConfig(rank=8, train_mlp=True))
    assert (spec.rank, spec.alpha) == (8, 8.0)
    assert isinstance(spec.alpha, float)


def test_lora_explicit_values_are_kept():
    config = types_pb2.LoraConfig(
        rank=4, alpha=2.5, train_attn=False, train_mlp=True, train_unembed=True, seed=42, train_experts=True
    )
    assert convert.lora_spec(config) == LoraSpec(
        rank=4, alpha=2.5, train_attn=False, train_mlp=True, train_unembed=True, seed=42, train_experts=True
    )


def test_adam_spec_copies_every_field():
    params = types_pb2.AdamParams(
        learning_rate=1e-3, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.1, grad_clip_norm=1.0
    )
    assert convert.adam_spec(params) == AdamSpec(1e-3, 0.8, 0.9, 1e-6, 0.1, 1.0)


def _batch_item(kind=trainer_pb2.ITEM_KIND_FORWARD_BACKWARD) -> trainer_pb2.BatchItem:
    item = trainer_pb2.BatchItem(item_id="op-1", adapter_id="runs/a", kind=kind, loss_fn="")
    d = item.data.add()
    d.model_input.chunks.add().encoded_text.tokens.extend([5, 6])
    d.model_input.chunks.add().encoded_text.tokens.extend([7])
    d.loss_fn_inputs["target_tokens"].CopyFrom(tensors.encode(np.int64([6, 7, 8])))
    d.loss_fn_inputs["weights"].CopyFrom(tensors.encode(np.float32([1, 0.5, 0])))
    item.loss_fn_config["clip"].number = 0.2
    item.loss_fn_config["mode"].text = "x"
    return item


def test_engine_item_decodes_tokens_inputs_and_config():
    item = convert.engine_item(_batch_item())
    assert (item.item_id, item.adapter_id, item.kind, item.loss_fn) == (
        "op-1", "runs/a", ItemKind.FORWARD_BACKWARD, "cross_entropy")
    assert item.loss_config == {"clip": 0.2, "mode": "x"}
    (datum,) = item.data
    assert datum.tokens.dtype == np.int64
    np.testing.assert_array_equal(datum.tokens, [5, 6, 7])
    np.testing.assert_array_equal(datum.loss_inputs["target_tokens"], [6, 7, 8])
    np.testing.assert_array_equal(datum.loss_inputs["weights"], np.float32([1, 0.5, 0]))
    assert convert.engine_item(_batch_item(trainer_pb2.ITEM_KIND_FORWARD)).kind is ItemKind.FORWARD


def test_engine_item_rejects_unspecified_kind_and_bad_tensors():
    with pytest.raises(InvalidArgumentError) as info:
        convert.engine_item(_batch_item(trainer_pb2.ITEM_KIND_UNSPECIFIED))
    assert info.value.reason == "BAD_ITEM_KIND"
    item = _batch_item()
    item.data[0].loss_fn_inputs["weights"].data = b"\x00" * 5
    with pytest.raises(InvalidArgumentError) as info:
        convert.engine_item(item)
    assert info.value.reason == "BAD_TENSOR"


def test_item_result_success_and_failure():
    outcome = ItemOutcome("op-1", outputs=[{"logprobs": np.float32([-1, -2])}], metrics={"loss:sum": 3.0})
    result = convert.item_result(outcome)
    assert result.item_id == "op-1" and result.WhichOneof("outcome") == "result"
    assert dict(result.result.metrics) == {"loss:sum": 3.0}
    np.testing.assert_array_equal(tensors.decode(result.result.outputs[0].loss_fn_outputs["logprobs"]), [-1, -2])
    failed = convert.item_result(ItemOutcome("op-2", failure=ItemFailure(3, "NON_FINITE_LOSS", "loss is nan")))
    assert failed.WhichOneof("outcome") == "error"
    assert (failed.error.code, failed.error.reason, failed.error.message) == (3, "NON_FINITE_LOSS", "loss is nan")


def test_supported_model():
    model = convert.supported_model(ModelInfo("m", "moe", 1024, 512, 64))
    assert (model.name, model.family, model.vocab_size, model.max_seq_len, model.max_lora_rank) == (
        "m", "moe", 1024, 512, 64)
