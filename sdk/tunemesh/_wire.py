"""Conversions between the SDK's dataclasses and the tunemesh.v1 protos."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tunemesh import tensors, types
from tunemesh.errors import Code, InvalidArgumentError, TunemeshError, error_for
from tunemesh.v1 import operations_pb2, sessions_pb2, training_pb2, types_pb2

UNSUPPORTED_CHUNK = "UNSUPPORTED_CHUNK"
UNSUPPORTED_PROVENANCE = "UNSUPPORTED_PROVENANCE"


def tensor_to_proto(tensor: types.TensorData) -> types_pb2.TensorData:
    return tensors.encode(tensor.to_numpy())


def tensor_from_proto(msg: types_pb2.TensorData, name: str = "tensor") -> types.TensorData:
    """Decode a wire tensor (bfloat16 is widened to float32); InvalidArgumentError
    [BAD_TENSOR] if it is malformed."""
    array = tensors.decode(msg, name=name)
    return types.TensorData(array, array.dtype.name)


def model_input_to_proto(model_input: types.ModelInput) -> types_pb2.ModelInput:
    """The wire ModelInput; InvalidArgumentError [UNSUPPORTED_CHUNK] for a chunk that is
    not text (tunemesh serves text models: Tinker's image chunks cannot be sent)."""
    chunks = []
    for chunk in model_input.chunks:
        if not isinstance(chunk, types.EncodedTextChunk):
            raise InvalidArgumentError(
                UNSUPPORTED_CHUNK,
                f"a ModelInput holds a {type(chunk).__name__}; tunemesh takes EncodedTextChunk only",
            )
        encoded = types_pb2.EncodedTextChunk(tokens=chunk.tokens)
        chunks.append(types_pb2.ModelInputChunk(encoded_text=encoded))
    return types_pb2.ModelInput(chunks=chunks)


def model_input_from_proto(msg: types_pb2.ModelInput) -> types.ModelInput:
    return types.ModelInput(
        [types.EncodedTextChunk(list(c.encoded_text.tokens)) for c in msg.chunks]
    )


def datum_to_proto(datum: types.Datum) -> types_pb2.Datum:
    """The wire Datum. Provenance spans are not sent: they annotate, and no tunemesh loss
    reads them (the one Tinker loss that does, stable_reinforce, is refused by name)."""
    inputs = {key: tensor_to_proto(value) for key, value in datum.loss_fn_inputs.items()}
    return types_pb2.Datum(
        model_input=model_input_to_proto(datum.model_input), loss_fn_inputs=inputs
    )


def datum_from_proto(msg: types_pb2.Datum) -> types.Datum:
    inputs = {key: tensor_from_proto(value, key) for key, value in msg.loss_fn_inputs.items()}
    return types.Datum(model_input_from_proto(msg.model_input), inputs)


def loss_config_to_proto(
    config: Mapping[str, float | str] | None,
) -> dict[str, types_pb2.LossConfigValue]:
    out = {}
    for key, value in (config or {}).items():
        if isinstance(value, str):
            out[key] = types_pb2.LossConfigValue(text=value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = types_pb2.LossConfigValue(number=float(value))
        else:
            raise TypeError(f"loss_fn_config[{key!r}] must be a number or a string")
    return out


def adam_to_proto(params: types.AdamParams) -> types_pb2.AdamParams:
    return types_pb2.AdamParams(
        learning_rate=params.learning_rate,
        beta1=params.beta1,
        beta2=params.beta2,
        eps=params.eps,
        weight_decay=params.weight_decay,
        grad_clip_norm=params.grad_clip_norm,
    )


def lora_to_proto(config: types.LoraConfig) -> types_pb2.LoraConfig:
    return types_pb2.LoraConfig(
        rank=config.rank,
        alpha=config.alpha or 0.0,
        seed=config.seed or 0,
        train_mlp=config.train_mlp,
        train_attn=config.train_attn,
        train_unembed=config.train_unembed,
        train_experts=config.train_experts,
    )


def lora_from_proto(msg: types_pb2.LoraConfig) -> types.LoraConfig:
    return types.LoraConfig(
        rank=msg.rank,
        alpha=msg.alpha or None,
        seed=msg.seed or None,
        train_mlp=msg.train_mlp,
        train_attn=msg.train_attn,
        train_unembed=msg.train_unembed,
        train_experts=msg.train_experts,
    )


def forward_request(
    cls: type, run: str, seq_id: int, request_id: str, data: Sequence[types.Datum],
    loss_fn: str, loss_fn_config: Mapping[str, float | str] | None,
):
    """Build a ForwardRequest or ForwardBackwardRequest (same fields)."""
    return cls(
        run=run,
        seq_id=seq_id,
        request_id=request_id,
        data=[datum_to_proto(d) for d in data],
        loss_fn=loss_fn,
        loss_fn_config=loss_config_to_proto(loss_fn_config),
    )


def optim_step_request(
    run: str, seq_id: int, request_id: str, params: types.AdamParams
) -> training_pb2.OptimStepRequest:
    return training_pb2.OptimStepRequest(
        run=run, seq_id=seq_id, request_id=request_id, adam_params=adam_to_proto(params)
    )


def forward_backward_output(op: operations_pb2.Operation) -> types.ForwardBackwardOutput:
    result = op.forward_backward
    outputs = [
        {key: tensor_from_proto(t, key) for key, t in out.loss_fn_outputs.items()}
        for out in result.outputs
    ]
    return types.ForwardBackwardOutput(outputs, dict(result.metrics))


def optim_step_output(op: operations_pb2.Operation) -> types.OptimStepResponse:
    return types.OptimStepResponse(dict(op.optim_step.metrics))


def save_output(op: operations_pb2.Operation, cls: type) -> Any:
    """SaveWeightsResponse / SaveWeightsForSamplerResponse of a finished save."""
    from tunemesh.checkpoints import checkpoint_from_proto

    checkpoint = op.save_checkpoint.checkpoint
    return cls(checkpoint.path, checkpoint_from_proto(checkpoint))


def load_output(op: operations_pb2.Operation) -> types.LoadWeightsResponse:
    return types.LoadWeightsResponse(op.load_state.path, op.load_state.step)


def operation_error(op: operations_pb2.Operation) -> TunemeshError | None:
    """The typed error of a finished operation, or None if it succeeded."""
    if op.state == operations_pb2.OPERATION_STATE_CANCELLED and not op.HasField("error"):
        return error_for(Code.CANCELLED, "CANCELLED", f"operation {op.name} was cancelled")
    if op.WhichOneof("result") != "error":
        return None
    return error_for(op.error.code, op.error.reason, op.error.message)


def run_info(run: training_pb2.TrainingRun) -> types.GetInfoResponse:
    return types.GetInfoResponse(
        model_id=run.name,
        model_data=types.ModelData(model_name=run.base_model),
        lora_config=lora_from_proto(run.lora_config),
        step=run.step,
        last_seq_id=run.last_seq_id,
        trainer_node=run.trainer_node,
        user_metadata=dict(run.user_metadata),
    )


def capabilities(msg: sessions_pb2.GetCapabilitiesResponse) -> types.GetServerCapabilitiesResponse:
    models = [
        types.SupportedModel(
            model_name=m.name,
            family=m.family,
            vocab_size=m.vocab_size,
            max_seq_len=m.max_seq_len,
            max_lora_rank=m.max_lora_rank,
        )
        for m in msg.models
    ]
    return types.GetServerCapabilitiesResponse(
        models, max_datums=msg.limits.max_datums, max_tokens=msg.limits.max_tokens
    )
