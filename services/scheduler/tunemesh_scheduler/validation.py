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
from tunemesh_common import checkpoint_paths, loss_specs, tensors
from tunemesh_common.errors import FailedPrecondition, InvalidArgument

MAX_TARGETS_PER_POSITION = 128  # K of (N, K) targets, e.g. top-k distillation


@dataclasses.dataclass(frozen=True)
class Limits:
    """Request size limits (from the scheduler settings)."""

    max_datums: int
    max_tokens: int
    max_samples: int = 16  # sequences per Sample request
    max_stop: int = 8  # stop strings (and stop token ids) per request
    max_stop_chars: int = 256  # characters per stop string


def datum_tokens(datum: types_pb2.Datum) -> list[int]:
    tokens: list[int] = []
    for chunk in datum.model_input.chunks:
        if chunk.WhichOneof("chunk") != "encoded_text":
            raise InvalidArgument("UNSUPPORTED_CHUNK", "only encoded_text chunks are supported")
        tokens.extend(chunk.encoded_text.tokens)
    return tokens


def check_loss(loss_fn: str, config) -> dict[str, float]:
    """The loss exists and its config is valid; returns the config with defaults."""
    values = {k: (v.number if v.WhichOneof("kind") == "number" else v.text) for k, v in config.items()}
    return loss_specs.spec_of(loss_fn).resolve_config(values)


def check_data(data, loss_fn: str, model: sessions_pb2.SupportedModel, limits: Limits) -> int:
    """Validate a forward / forward_backward payload; return its total token count."""
    if not data:
        raise InvalidArgument("EMPTY_DATA", "data is empty: send at least one Datum")
    if len(data) > limits.max_datums:
        raise InvalidArgument("REQUEST_TOO_LARGE", f"{len(data)} datums exceed the limit of {limits.max_datums}")
    total = 0
    for index, datum in enumerate(data):
        total += _check_datum(index, datum, loss_fn, model)
        if total > limits.max_tokens:
            raise InvalidArgument("REQUEST_TOO_LARGE", f"request exceeds {limits.max_tokens} tokens")
    return total


def _check_datum(index: int, datum: types_pb2.Datum, loss_fn: str, model: sessions_pb2.SupportedModel) -> int:
    where = f"data[{index}]"
    tokens = np.asarray(datum_tokens(datum), dtype=np.int64)
    n = int(tokens.size)
    if n == 0:
        raise InvalidArgument("EMPTY_INPUT", f"{where}.model_input has no tokens")
    if n > model.max_seq_len:
        raise InvalidArgument("SEQUENCE_TOO_LONG", f"{where}: {n} tokens exceed {model.name}'s {model.max_seq_len}")
    _check_token_range(tokens, model.vocab_size, f"{where}.model_input")
    spec = loss_specs.spec_of(loss_fn)
    missing = set(spec.required_inputs) - set(datum.loss_fn_inputs)
    if missing:
        raise InvalidArgument("MISSING_LOSS_INPUT", f"{where}: {loss_fn} needs loss_fn_inputs {sorted(missing)}")
    unknown = set(datum.loss_fn_inputs) - set(spec.required_inputs) - set(spec.optional_inputs)
    if unknown:
        raise InvalidArgument("UNKNOWN_LOSS_INPUT", f"{where}: {loss_fn} does not take {sorted(unknown)}")
    shapes = {}
    for key, tensor in datum.loss_fn_inputs.items():
        shapes[key] = _check_input(f"{where}.loss_fn_inputs[{key!r}]", key, tensor, n, model.vocab_size)
    for key, shape in shapes.items():
        if shape != shapes["target_tokens"]:
            raise InvalidArgument(
                "SHAPE_MISMATCH", f"{where}: {key} shape {list(shape)} != target_tokens {list(shapes['target_tokens'])}"
            )
    return n


def _check_input(where: str, key: str, tensor: types_pb2.TensorData, n: int, vocab_size: int) -> tuple:
    array = tensors.decode(tensor, name=where)
    if array.ndim not in (1, 2) or array.shape[0] != n:
        raise InvalidArgument(
            "SHAPE_MISMATCH", f"{where}: shape {list(array.shape)} must be ({n},) or ({n}, K) to match model_input"
        )
    if array.ndim == 2 and not 1 <= array.shape[1] <= MAX_TARGETS_PER_POSITION:
        raise InvalidArgument(
            "TOO_MANY_TARGETS", f"{where}: K = {array.shape[1]} must lie in [1, {MAX_TARGETS_PER_POSITION}]"
        )
    if key in loss_specs.INTEGER_INPUTS:
        if array.dtype.kind != "i":
            raise InvalidArgument("BAD_DTYPE", f"{where}: must be an integer tensor")
        _check_token_range(array, vocab_size, where)
    elif array.dtype.kind != "f":
        raise InvalidArgument("BAD_DTYPE", f"{where}: must be a float tensor")
    elif not np.isfinite(array).all():
        raise InvalidArgument("NON_FINITE_INPUT", f"{where}: contains NaN or infinity")
    return array.shape


def _check_token_range(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bad.any():
        position = int(np.flatnonzero(bad.reshape(-1))[0])
        raise InvalidArgument(
            "TOKEN_OUT_OF_RANGE",
            f"{where}: token {int(tokens.reshape(-1)[position])} at position {position} is outside [0, {vocab_size})",
        )


def check_adam(params: types_pb2.AdamParams) -> None:
    values = {f.name: v for f, v in params.ListFields()}
    for name, value in values.items():
        if not math.isfinite(value) or value < 0:
            raise InvalidArgument("BAD_OPTIMIZER_PARAM", f"adam_params.{name} = {value} must be finite and >= 0")
    for name in ("beta1", "beta2"):
        if getattr(params, name) >= 1:
            raise InvalidArgument("BAD_OPTIMIZER_PARAM", f"adam_params.{name} must be < 1")
    if params.eps <= 0:
        raise InvalidArgument("BAD_OPTIMIZER_PARAM", "adam_params.eps must be > 0 (Tinker's default is 1e-12)")


def check_lora(config: types_pb2.LoraConfig, model: sessions_pb2.SupportedModel) -> None:
    rank = config.rank or 32
    if not 1 <= rank <= model.max_lora_rank:
        raise InvalidArgument(
            "BAD_LORA_RANK", f"LoRA rank {rank} is outside [1, {model.max_lora_rank}] for {model.name}"
        )
    if not math.isfinite(config.alpha) or config.alpha < 0:
        raise InvalidArgument("BAD_LORA_ALPHA", "LoRA alpha must be finite and >= 0")
    experts = config.train_experts and model.family == "moe"
    if not (config.train_attn or config.train_mlp or config.train_unembed or experts):
        raise InvalidArgument("NO_LORA_TARGETS", "enable at least one of train_attn, train_mlp, train_unembed"
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


def check_save(request) -> None:
    """SaveState / SaveWeightsForSampler: name (if given), TTL and labels."""
    if request.name:
        checkpoint_paths.check_name(request.name)
    checkpoint_paths.check_ttl(request.ttl_seconds)
    checkpoint_paths.check_user_metadata(dict(request.user_metadata))


def check_checkpoint_fits(checkpoint, base_model: str, lora: types_pb2.LoraConfig, with_optimizer: bool) -> None:
    """A checkpoint can be loaded into a run with `base_model` and `lora` (FailedPrecondition if not)."""
    if checkpoint.base_model != base_model:
        raise FailedPrecondition(
            "WRONG_BASE_MODEL", f"{checkpoint.path} is for {checkpoint.base_model}, the run uses {base_model}"
        )
    ck = checkpoint.lora_config
    missing = [s for s in ("train_attn", "train_mlp", "train_unembed", "train_experts") if getattr(ck, s) and not getattr(lora, s)]
    if (ck.rank, ck.alpha) != (lora.rank, lora.alpha) or missing:
        raise FailedPrecondition(
            "LORA_CONFIG_MISMATCH",
            f"{checkpoint.path} has rank {ck.rank}, alpha {ck.alpha:g}{', ' + ', '.join(missing) if missing else ''};"
            f" the run has rank {lora.rank}, alpha {lora.alpha:g}",
        )
    if with_optimizer and not checkpoint.has_optimizer_state:
        raise FailedPrecondition("NO_OPTIMIZER_STATE", f"{checkpoint.path} holds weights only; load it without optimizer state")


def check_prompt(prompt: types_pb2.ModelInput, model: sessions_pb2.SupportedModel) -> tuple[int, ...]:
    """A sampling prompt's token ids: non-empty and within the vocabulary."""
    tokens: list[int] = []
    for chunk in prompt.chunks:
        if chunk.WhichOneof("chunk") != "encoded_text":
            raise InvalidArgument("UNSUPPORTED_CHUNK", "only encoded_text chunks are supported")
        tokens.extend(chunk.encoded_text.tokens)
    if not tokens:
        raise InvalidArgument("EMPTY_PROMPT", "the prompt is empty: send at least one token")
    _check_token_range(np.asarray(tokens, dtype=np.int64), model.vocab_size, "prompt")
    if len(tokens) > model.max_seq_len:
        raise InvalidArgument("CONTEXT_EXCEEDED", f"the prompt has {len(tokens)} tokens; {model.name} takes {model.max_seq_len}")
    return tuple(tokens)


def check_sampling(params, num_samples: int, prompt_len: int, model: sessions_pb2.SupportedModel, limits: Limits) -> None:
    """SamplingParams and num_samples of a Sample request."""
    if not 1 <= num_samples <= limits.max_samples:
        raise InvalidArgument("BAD_NUM_SAMPLES", f"num_samples must lie in [1, {limits.max_samples}], got {num_samples}")
    if params.max_tokens < 1:
        raise InvalidArgument("BAD_MAX_TOKENS", f"max_tokens must be >= 1, got {params.max_tokens}")
    if prompt_len + params.max_tokens > model.max_seq_len:
        raise InvalidArgument(
            "CONTEXT_EXCEEDED",
            f"prompt ({prompt_len}) + max_tokens ({params.max_tokens}) exceeds {model.name}'s context of {model.max_seq_len}",
        )
    if not (math.isfinite(params.temperature) and params.temperature >= 0):
        raise InvalidArgument("BAD_TEMPERATURE", "temperature must be finite and >= 0 (0: greedy)")
    if not (0 <= params.top_p <= 1):
        raise InvalidArgument("BAD_TOP_P", "top_p must lie in [0, 1] (0 means 1)")
    if params.top_k < 0:
        raise InvalidArgument("BAD_TOP_K", "top_k must be >= 0 (0: no limit)")
    if len(params.stop) > limits.max_stop or any(not s or len(s) > limits.max_stop_chars for s in params.stop):
        raise InvalidArgument(
            "BAD_STOP", f"at most {limits.max_stop} non-empty stop strings of <= {limits.max_stop_chars} characters"
        )
    if len(params.stop_token_ids) > limits.max_stop:
        raise InvalidArgument("BAD_STOP", f"at most {limits.max_stop} stop token ids")
    _check_token_range(np.asarray(list(params.stop_token_ids), dtype=np.int64), model.vocab_size, "stop_token_ids")
