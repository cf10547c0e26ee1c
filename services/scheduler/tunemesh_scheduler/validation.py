"""Checks on public requests, run before anything is queued.

Every failure is INVALID_ARGUMENT (FAILED_PRECONDITION when a checkpoint does not fit
a run) with a reason and a message naming the offending datum and field; nothing that
fails here reaches a trainer.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tunemesh.v1 import sessions_pb2, types_pb2
from tunemesh import tensors
from tunemesh_common.checkpoints import paths as checkpoint_paths
from tunemesh_common.training import datum_rules, loss_specs
from tunemesh.errors import FailedPreconditionError, InvalidArgumentError


@dataclasses.dataclass(frozen=True)
class Limits:
    """Request size limits (from the scheduler settings)."""

    max_datums: int
    max_tokens: int
    max_samples: int = 16  # sequences per Sample request
    max_stop: int = 8  # stop strings (and stop token ids) per request
    max_stop_chars: int = 256  # characters per stop string


def input_tokens(model_input: types_pb2.ModelInput) -> np.ndarray:
    """The token ids of a model input (its chunks concatenated), as int64."""
    chunks = []
    for chunk in model_input.chunks:
        if chunk.WhichOneof("chunk") != "encoded_text":
            raise InvalidArgumentError(datum_rules.UNSUPPORTED_CHUNK, "only encoded_text chunks are supported")
        chunks.append(np.array(chunk.encoded_text.tokens, dtype=np.int64))
    return np.concatenate(chunks or [np.zeros(0, dtype=np.int64)])


def _token_count(model_input: types_pb2.ModelInput) -> int:
    """The number of token ids of a model input, from the protobuf lengths (no copy)."""
    if any(chunk.WhichOneof("chunk") != "encoded_text" for chunk in model_input.chunks):
        raise InvalidArgumentError(datum_rules.UNSUPPORTED_CHUNK, "only encoded_text chunks are supported")
    return sum(len(chunk.encoded_text.tokens) for chunk in model_input.chunks)


def check_loss(loss_fn: str, config) -> dict[str, float]:
    """The loss exists and its config is valid; returns the config with defaults."""
    values = {k: (v.number if v.WhichOneof("kind") == "number" else v.text) for k, v in config.items()}
    return loss_specs.spec_of(loss_fn).resolve_config(values)


def check_data(data, loss_fn: str, model: sessions_pb2.SupportedModel, limits: Limits) -> int:
    """Validate a forward / forward_backward payload; return its total token count."""
    if not data:
        raise InvalidArgumentError(datum_rules.EMPTY_DATA, "data is empty: send at least one Datum")
    if len(data) > limits.max_datums:
        raise InvalidArgumentError("REQUEST_TOO_LARGE", f"{len(data)} datums exceed the limit of {limits.max_datums}")
    total = 0
    for index, datum in enumerate(data):
        total += _check_datum(index, datum, loss_fn, model)
        if total > limits.max_tokens:
            raise InvalidArgumentError("REQUEST_TOO_LARGE", f"request exceeds {limits.max_tokens} tokens")
    return total


def _check_datum(index: int, datum: types_pb2.Datum, loss_fn: str, model: sessions_pb2.SupportedModel) -> int:
    """Sizes first, from the protobuf lengths (token count, each input's shape), so nothing
    oversized is copied or decoded; then the decoded datum against the datum rules."""
    where = f"data[{index}]"
    n = datum_rules.check_token_count(_token_count(datum.model_input), max_seq_len=model.max_seq_len,
                                      where=f"{where}.model_input")
    for key, tensor in datum.loss_fn_inputs.items():
        datum_rules.check_input_shape(tensor.shape, n, f"{where}.loss_fn_inputs[{key!r}]")
    inputs = {key: tensors.decode(tensor, name=f"{where}.loss_fn_inputs[{key!r}]")
              for key, tensor in datum.loss_fn_inputs.items()}
    return datum_rules.check_datum(
        input_tokens(datum.model_input), inputs, loss_specs.spec_of(loss_fn),
        vocab_size=model.vocab_size, max_seq_len=model.max_seq_len, where=where,
    )


MAX_DURATION_S = 315_576_000_000  # google.protobuf.Duration's range: +-10,000 years


def duration_seconds(duration, field: str) -> float:
    """A google.protobuf.Duration in seconds, checked against its documented range (seconds
    within +-MAX_DURATION_S, nanos within +-999,999,999 and of the same sign) from the raw
    fields, so no value overflows a conversion (InvalidArgumentError [BAD_DURATION])."""
    seconds, nanos = duration.seconds, duration.nanos
    if abs(seconds) > MAX_DURATION_S or abs(nanos) > 999_999_999 or seconds * nanos < 0:
        raise InvalidArgumentError(
            "BAD_DURATION", f"{field} = {seconds}s {nanos}ns is not a valid Duration (|seconds| <= {MAX_DURATION_S}, "
            "|nanos| < 1e9, both of one sign)"
        )
    return seconds + nanos / 1e9


def check_adam(params: types_pb2.AdamParams) -> None:
    values = {f.name: v for f, v in params.ListFields()}
    for name, value in values.items():
        if not math.isfinite(value) or value < 0:
            raise InvalidArgumentError("BAD_OPTIMIZER_PARAM", f"adam_params.{name} = {value} must be finite and >= 0")
    for name in ("beta1", "beta2"):
        if getattr(params, name) >= 1:
            raise InvalidArgumentError("BAD_OPTIMIZER_PARAM", f"adam_params.{name} must be < 1")
    if params.eps <= 0:
        raise InvalidArgumentError("BAD_OPTIMIZER_PARAM", "adam_params.eps must be > 0 (Tinker's default is 1e-12)")


def check_lora(config: types_pb2.LoraConfig, model: sessions_pb2.SupportedModel) -> None:
    rank = config.rank or 32
    if not 1 <= rank <= model.max_lora_rank:
        raise InvalidArgumentError(
            "BAD_LORA_RANK", f"LoRA rank {rank} is outside [1, {model.max_lora_rank}] for {model.name}"
        )
    if not math.isfinite(config.alpha) or config.alpha < 0:
        raise InvalidArgumentError("BAD_LORA_ALPHA", "LoRA alpha must be finite and >= 0")
    experts = config.train_experts and model.family == "moe"
    if not (config.train_attn or config.train_mlp or config.train_unembed or experts):
        raise InvalidArgumentError("NO_LORA_TARGETS", "enable at least one of train_attn, train_mlp, train_unembed"
                              + (", train_experts" if model.family == "moe" else ""))


def normalized_lora(config: types_pb2.LoraConfig, model: sessions_pb2.SupportedModel) -> types_pb2.LoraConfig:
    """The config as stored and sent to trainers: rank 0 -> 32, alpha 0 -> rank,
    train_experts off on dense models (they have no experts)."""
    normalized = types_pb2.LoraConfig()
    normalized.CopyFrom(config)
    normalized.train_experts = config.train_experts and model.family == "moe"
    normalized.rank = config.rank or 32
    normalized.alpha = config.alpha or float(normalized.rank)
    return normalized


def run_user_metadata(metadata) -> tuple[tuple[str, str], ...]:
    """A run's user_metadata (bounded like checkpoint labels), sorted by key."""
    return tuple(sorted(checkpoint_paths.check_user_metadata(dict(metadata)).items()))


def check_save(request) -> None:
    """SaveState / SaveWeightsForSampler: name (if given), TTL and labels."""
    if request.name:
        checkpoint_paths.check_name(request.name)
    checkpoint_paths.check_ttl(request.ttl_seconds)
    checkpoint_paths.check_user_metadata(dict(request.user_metadata))


def check_checkpoint_fits(checkpoint, base_model: str, lora: types_pb2.LoraConfig, with_optimizer: bool) -> None:
    """A checkpoint can be loaded into a run with `base_model` and `lora` (FailedPreconditionError if not)."""
    if checkpoint.base_model != base_model:
        raise FailedPreconditionError(
            "WRONG_BASE_MODEL", f"{checkpoint.path} is for {checkpoint.base_model}, the run uses {base_model}"
        )
    ck = checkpoint.lora_config
    missing = [s for s in ("train_attn", "train_mlp", "train_unembed", "train_experts") if getattr(ck, s) and not getattr(lora, s)]
    if (ck.rank, ck.alpha) != (lora.rank, lora.alpha) or missing:
        raise FailedPreconditionError(
            "LORA_CONFIG_MISMATCH",
            f"{checkpoint.path} has rank {ck.rank}, alpha {ck.alpha:g}{', ' + ', '.join(missing) if missing else ''};"
            f" the run has rank {lora.rank}, alpha {lora.alpha:g}",
        )
    if with_optimizer and not checkpoint.has_optimizer_state:
        raise FailedPreconditionError("NO_OPTIMIZER_STATE", f"{checkpoint.path} holds weights only; load it without optimizer state")


def check_prompt(prompt: types_pb2.ModelInput, model: sessions_pb2.SupportedModel) -> tuple[int, ...]:
    """A sampling prompt's token ids: non-empty and within the vocabulary."""
    tokens = input_tokens(prompt)
    if not tokens.size:
        raise InvalidArgumentError("EMPTY_PROMPT", "the prompt is empty: send at least one token")
    datum_rules.check_token_ids(tokens, model.vocab_size, "prompt")
    if tokens.size > model.max_seq_len:
        raise InvalidArgumentError("CONTEXT_EXCEEDED", f"the prompt has {tokens.size} tokens; {model.name} takes {model.max_seq_len}")
    return tuple(tokens.tolist())


def check_sampling(params, num_samples: int, prompt_len: int, model: sessions_pb2.SupportedModel, limits: Limits) -> int:
    """SamplingParams and num_samples of a Sample request; returns the new-token budget
    (`max_tokens`, or with 0 what the context leaves after the prompt)."""
    if not 1 <= num_samples <= limits.max_samples:
        raise InvalidArgumentError("BAD_NUM_SAMPLES", f"num_samples must lie in [1, {limits.max_samples}], got {num_samples}")
    if params.max_tokens < 0:
        raise InvalidArgumentError("BAD_MAX_TOKENS", f"max_tokens must be >= 0 (0: up to the context limit), got {params.max_tokens}")
    max_tokens = params.max_tokens or model.max_seq_len - prompt_len
    if max_tokens < 1 or prompt_len + max_tokens > model.max_seq_len:
        raise InvalidArgumentError(
            "CONTEXT_EXCEEDED",
            f"prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds {model.name}'s context of {model.max_seq_len}",
        )
    if not (math.isfinite(params.temperature) and params.temperature >= 0):
        raise InvalidArgumentError("BAD_TEMPERATURE", "temperature must be finite and >= 0 (0: greedy)")
    if not (0 <= params.top_p <= 1):
        raise InvalidArgumentError("BAD_TOP_P", "top_p must lie in [0, 1] (0 means 1)")
    if params.top_k < 0:
        raise InvalidArgumentError("BAD_TOP_K", "top_k must be >= 0 (0: no limit)")
    if len(params.stop) > limits.max_stop or any(not s or len(s) > limits.max_stop_chars for s in params.stop):
        raise InvalidArgumentError(
            "BAD_STOP", f"at most {limits.max_stop} non-empty stop strings of <= {limits.max_stop_chars} characters"
        )
    if len(params.stop_token_ids) > limits.max_stop:
        raise InvalidArgumentError("BAD_STOP", f"at most {limits.max_stop} stop token ids")
    datum_rules.check_token_ids(np.array(params.stop_token_ids, dtype=np.int64), model.vocab_size, "stop_token_ids")
    return max_tokens
