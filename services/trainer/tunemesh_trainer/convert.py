"""Proto <-> domain conversion for the trainer (the only module that knows both)."""

from __future__ import annotations

import numpy as np

from tunemesh_internal.v1 import trainer_pb2
from tunemesh.v1 import operations_pb2, sessions_pb2, types_pb2
from tunemesh import tensors
from tunemesh.errors import InvalidArgumentError
from tunemesh_trainer.domain import (
    AdamSpec, DatumArrays, EngineItem, ItemKind, ItemOutcome, LoraSpec, ModelInfo, OptimItem,
)

_KINDS = {
    trainer_pb2.ITEM_KIND_FORWARD: ItemKind.FORWARD,
    trainer_pb2.ITEM_KIND_FORWARD_BACKWARD: ItemKind.FORWARD_BACKWARD,
}


def lora_spec(config: types_pb2.LoraConfig) -> LoraSpec:
    rank = config.rank or 32
    return LoraSpec(
        rank=rank,
        alpha=float(config.alpha or rank),
        train_attn=config.train_attn,
        train_mlp=config.train_mlp,
        train_unembed=config.train_unembed,
        seed=config.seed,
        train_experts=config.train_experts,
    )


def lora_config(spec: LoraSpec) -> types_pb2.LoraConfig:
    return types_pb2.LoraConfig(
        rank=spec.rank, alpha=spec.alpha, train_attn=spec.train_attn, train_mlp=spec.train_mlp,
        train_unembed=spec.train_unembed, seed=spec.seed, train_experts=spec.train_experts,
    )


def adam_spec(params: types_pb2.AdamParams) -> AdamSpec:
    return AdamSpec(
        learning_rate=params.learning_rate,
        beta1=params.beta1,
        beta2=params.beta2,
        eps=params.eps,
        weight_decay=params.weight_decay,
        grad_clip_norm=params.grad_clip_norm,
    )


def model_input_tokens(model_input: types_pb2.ModelInput) -> np.ndarray:
    tokens: list[int] = []
    for chunk in model_input.chunks:
        if chunk.WhichOneof("chunk") != "encoded_text":
            raise InvalidArgumentError("UNSUPPORTED_CHUNK", "only encoded_text chunks are supported")
        tokens.extend(chunk.encoded_text.tokens)
    return np.asarray(tokens, dtype=np.int64)


def datum_arrays(datum: types_pb2.Datum) -> DatumArrays:
    return DatumArrays(
        tokens=model_input_tokens(datum.model_input),
        loss_inputs={k: tensors.decode(v, name=k) for k, v in datum.loss_fn_inputs.items()},
    )


def loss_config(config) -> dict[str, float | str]:
    return {k: (v.number if v.WhichOneof("kind") == "number" else v.text) for k, v in config.items()}


def optim_item(item: trainer_pb2.BatchItem) -> OptimItem:
    return OptimItem(item_id=item.item_id, adapter_id=item.adapter_id, adam=adam_spec(item.adam_params),
                     snapshot=item.HasField("snapshot"))


def engine_item(item: trainer_pb2.BatchItem) -> EngineItem:
    if item.kind not in _KINDS:
        raise InvalidArgumentError("BAD_ITEM_KIND", f"item {item.item_id}: kind {item.kind} is not forward or forward_backward")
    return EngineItem(
        item_id=item.item_id,
        adapter_id=item.adapter_id,
        kind=_KINDS[item.kind],
        data=[datum_arrays(d) for d in item.data],
        loss_fn=item.loss_fn or "cross_entropy",
        loss_config=loss_config(item.loss_fn_config),
    )


def item_result(outcome: ItemOutcome, optim: bool = False) -> trainer_pb2.BatchItemResult:
    if outcome.failure is not None:
        f = outcome.failure
        return trainer_pb2.BatchItemResult(
            item_id=outcome.item_id,
            error=operations_pb2.OperationError(code=f.code, reason=f.reason, message=f.message),
        )
    if optim:
        return trainer_pb2.BatchItemResult(
            item_id=outcome.item_id, optim_step=types_pb2.OptimStepResult(metrics=outcome.metrics)
        )
    result = types_pb2.ForwardBackwardResult(metrics=outcome.metrics)
    for datum_outputs in outcome.outputs:
        result.outputs.add(loss_fn_outputs={k: tensors.encode(v) for k, v in datum_outputs.items()})
    return trainer_pb2.BatchItemResult(item_id=outcome.item_id, result=result)


def item_error(item_id: str, code: int, reason: str, message: str) -> trainer_pb2.BatchItemResult:
    return trainer_pb2.BatchItemResult(
        item_id=item_id, error=operations_pb2.OperationError(code=code, reason=reason, message=message)
    )


def supported_model(info: ModelInfo) -> sessions_pb2.SupportedModel:
    return sessions_pb2.SupportedModel(
        name=info.name,
        family=info.family,
        vocab_size=info.vocab_size,
        max_seq_len=info.max_seq_len,
        max_lora_rank=info.max_lora_rank,
    )
