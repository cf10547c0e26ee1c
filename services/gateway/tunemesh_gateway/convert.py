"""Tinker's wire forms (its protobuf `tinker_public_pb2`, its pydantic JSON types) <->
`tunemesh.v1` messages: pure functions, no I/O.

Names: a Tinker `session_id` is the id of `sessions/{id}`, a `sampling_session_id` the id
of `sampling_sessions/{id}`, a training run is `{session_id}:train:{n}` (the SDK builds it
itself). Paths map textually once the run is known:

    tinker://{model_id}/weights/{name}           tunemesh://runs/{run}/state/{name}
    tinker://{model_id}/sampler_weights/{name}   tunemesh://runs/{run}/sampler/{name}
    tinker://imports/sampler_weights/{name}      tunemesh://imports/{name}
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from tinker import types as tt
from tinker.proto import tinker_public_pb2 as tpb

from tunemesh.errors import InvalidArgumentError
from tunemesh.v1 import checkpoints_pb2, sampling_pb2, training_pb2, types_pb2

from tunemesh_gateway.status import Unsupported

TINKER_SCHEME = "tinker://"
TUNEMESH_SCHEME = "tunemesh://"
IMPORTS = "imports"  # the training_run_id of imported checkpoints in tinker paths
MODEL_ID_LABEL = "tinker.model_id"  # the run's user_metadata label naming its Tinker model id
GATEWAY_LABELS = "tinker."  # labels the gateway sets itself: not shown as the user's metadata
KIND_BY_TINKER = {"weights": "state", "sampler_weights": "sampler"}
TINKER_BY_KIND = {"state": "weights", "sampler": "sampler_weights", IMPORTS: "sampler_weights"}
CHECKPOINT_TYPE = {"weights": "training", "sampler_weights": "sampler"}
UNSUPPORTED_LOSSES = frozenset({"stable_reinforce", "custom"})
_FLOAT32 = np.dtype("<f4")


# -- names ---------------------------------------------------------------------------

def session_name(session_id: str) -> str:
    return f"sessions/{session_id}"


def session_id_of(name: str) -> str:
    return name.removeprefix("sessions/")


def model_id(session_id: str, model_seq_id: int) -> str:
    """The training run id the SDK expects (and builds itself for create-via-load)."""
    return f"{session_id}:train:{model_seq_id}"


def sampler_name(sampling_session_id: str) -> str:
    return f"sampling_sessions/{sampling_session_id}"


def sampler_id_of(name: str) -> str:
    return name.removeprefix("sampling_sessions/")


@dataclasses.dataclass(frozen=True)
class TinkerPath:
    """`tinker://{training_run_id}/{kind}/{name}`, kind `weights` or `sampler_weights`."""

    training_run_id: str
    kind: str
    name: str

    @classmethod
    def parse(cls, path: str) -> TinkerPath:
        if not isinstance(path, str) or not path.startswith(TINKER_SCHEME):
            raise InvalidArgumentError("BAD_CHECKPOINT_PATH", f"{str(path)[:140]!r} is not a tinker:// path")
        parts = path[len(TINKER_SCHEME):].split("/")
        if len(parts) != 3 or not all(parts):
            raise InvalidArgumentError(
                "BAD_CHECKPOINT_PATH", f"{path[:140]!r}: expected tinker://<run>/<weights|sampler_weights>/<name>")
        if parts[1] == "external_weights":
            raise Unsupported("external_weights checkpoints")
        if parts[1] not in KIND_BY_TINKER:
            raise InvalidArgumentError("BAD_CHECKPOINT_PATH", f"{path[:140]!r}: unknown checkpoint kind {parts[1]!r}")
        return cls(*parts)

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"

    def __str__(self) -> str:
        return f"{TINKER_SCHEME}{self.training_run_id}/{self.kind}/{self.name}"

    def tunemesh(self, run: str) -> str:
        """The tunemesh path, given the run (`runs/{id}`) its training_run_id names."""
        if self.training_run_id == IMPORTS:
            return f"{TUNEMESH_SCHEME}{IMPORTS}/{self.name}"
        return f"{TUNEMESH_SCHEME}{run}/{KIND_BY_TINKER[self.kind]}/{self.name}"


def tinker_path(path: str, training_run_id: str) -> TinkerPath:
    """The tinker path of tunemesh checkpoint `path`, whose run Tinker calls `training_run_id`."""
    parts = path.removeprefix(TUNEMESH_SCHEME).split("/")
    if len(parts) == 2 and parts[0] == IMPORTS:
        return TinkerPath(IMPORTS, TINKER_BY_KIND[IMPORTS], parts[1])
    if len(parts) == 4 and parts[0] == "runs" and parts[2] in TINKER_BY_KIND:
        return TinkerPath(training_run_id, TINKER_BY_KIND[parts[2]], parts[3])
    raise ValueError(f"not a tunemesh checkpoint path: {path!r}")


def run_of_path(path: str) -> str:
    """`runs/{id}` of a tunemesh checkpoint path ('' for an import)."""
    parts = path.removeprefix(TUNEMESH_SCHEME).split("/")
    return f"runs/{parts[1]}" if len(parts) == 4 and parts[0] == "runs" else ""


def labels(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """Tinker's free-form user_metadata as tunemesh's string labels (non-strings as JSON)."""
    return {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}


def run_labels(metadata: Mapping[str, Any] | None, model: str) -> dict[str, str]:
    """A new run's user_metadata: the caller's, and the Tinker model id it answers to."""
    return {**labels(metadata), MODEL_ID_LABEL: model}


def user_labels(labels: Mapping[str, str]) -> dict[str, str] | None:
    """The caller's own labels (the gateway's left out), None when there are none."""
    return {k: v for k, v in labels.items() if not k.startswith(GATEWAY_LABELS)} or None


# -- training ------------------------------------------------------------------------

def lora_config(config: tt.LoraConfig | None) -> types_pb2.LoraConfig:
    """Tinker's LoRA config; its default rank is 32, MLP covers MoE experts too."""
    config = config or tt.LoraConfig(rank=32)
    lora = types_pb2.LoraConfig(rank=config.rank, train_attn=config.train_attn, train_mlp=config.train_mlp,
                                train_unembed=config.train_unembed, train_experts=config.train_mlp)
    if config.seed is not None:
        lora.seed = config.seed
    return lora


def check_optimizer(config: Any) -> None:
    """Only AdamW exists in tunemesh."""
    kind = getattr(config, "type", "adamw")
    if kind != "adamw":
        raise Unsupported(f"optimizer {kind!r} (tunemesh trains with AdamW)")


def adam_params(params: Any) -> types_pb2.AdamParams:
    if not isinstance(params, tt.AdamParams):
        raise Unsupported(f"optimizer_params of type {getattr(params, 'type', '?')!r} (AdamW only)")
    return types_pb2.AdamParams(learning_rate=params.learning_rate, beta1=params.beta1, beta2=params.beta2,
                                eps=params.eps, weight_decay=params.weight_decay, grad_clip_norm=params.grad_clip_norm)


def training_request_id(model: str, seq_id: int) -> str:
    """The idempotency key of a training call: the SDK re-sends one (model, seq_id) as is."""
    return f"{model}#{seq_id}"


def data_call(request: tpb.ForwardBackwardRequest,
              run: str) -> training_pb2.ForwardRequest | training_pb2.ForwardBackwardRequest:
    """A decoded `/forward_backward` body as a tunemesh Forward (forward_only) or ForwardBackward."""
    if request.loss_fn in UNSUPPORTED_LOSSES:
        raise Unsupported(f"loss_fn {request.loss_fn!r}")
    cls = training_pb2.ForwardRequest if request.forward_only else training_pb2.ForwardBackwardRequest
    call = cls(run=run, seq_id=request.seq_id, request_id=training_request_id(request.model_id, request.seq_id),
               loss_fn=request.loss_fn, data=[datum(d, i) for i, d in enumerate(request.data)])
    if request.loss_fn_config_v2:
        for key, value in request.loss_fn_config_v2.items():
            call.loss_fn_config[key].CopyFrom(_config_value(value))
    else:
        for key, number in request.loss_fn_config.items():
            call.loss_fn_config[key].number = number
    return call


def _config_value(value: tpb.LossConfigValue) -> types_pb2.LossConfigValue:
    if value.WhichOneof("value") == "text":
        return types_pb2.LossConfigValue(text=value.text)
    return types_pb2.LossConfigValue(number=value.number)


def datum(d: tpb.Datum, index: int = 0) -> types_pb2.Datum:
    """Int32 tokens become ids, CSR tensors dense (pad 0); provenance spans are dropped
    (only stable_reinforce reads them)."""
    out = types_pb2.Datum()
    for chunk in d.model_input:
        which = chunk.WhichOneof("chunk")
        if which != "encoded_text":
            raise Unsupported(f"{which} chunks (datum {index}): tunemesh models read token ids only")
        out.model_input.chunks.add().encoded_text.tokens.extend(int32_tokens(chunk.encoded_text.tokens, index))
    for name, tensor in d.loss_fn_inputs.items():
        out.loss_fn_inputs[name].CopyFrom(tensor_data(tensor, f"data[{index}].loss_fn_inputs[{name!r}]"))
    return out


def int32_tokens(raw: bytes, index: int = 0) -> list[int]:
    if len(raw) % 4:
        raise InvalidArgumentError("BAD_TOKENS", f"datum {index}: token bytes are not whole int32s")
    return np.frombuffer(raw, dtype="<i4").tolist()


_ITEM = {types_pb2.DTYPE_FLOAT32: np.dtype("<f4"), types_pb2.DTYPE_INT64: np.dtype("<i8"),
         types_pb2.DTYPE_INT32: np.dtype("<i4"), types_pb2.DTYPE_BFLOAT16: np.dtype("<u2")}


def tensor_data(tensor: tpb.Tensor, name: str) -> types_pb2.TensorData:
    """A Tinker tensor (dense, or CSR filled with 0) as a dense TensorData; a missing shape
    is read as 1-D."""
    dtype = _ITEM.get(tensor.dtype)
    if dtype is None:
        raise InvalidArgumentError("BAD_TENSOR", f"{name}: unsupported dtype {tensor.dtype}")
    shape = list(tensor.shape)
    if tensor.WhichOneof("encoding") != "sparse_csr":
        if not shape:
            shape = [len(tensor.dense) // dtype.itemsize]
        return types_pb2.TensorData(dtype=tensor.dtype, shape=shape, data=tensor.dense)
    return types_pb2.TensorData(dtype=tensor.dtype, shape=shape, data=_densify(tensor.sparse_csr, shape, dtype, name))


def _densify(csr: tpb.SparseCsr, shape: list[int], dtype: np.dtype, name: str) -> bytes:
    bad = InvalidArgumentError("BAD_TENSOR", f"{name}: malformed sparse CSR tensor of shape {shape}")
    if len(shape) != 2 or min(shape) < 0 or shape[0] * shape[1] > 1 << 28:
        raise bad
    if len(csr.values) % dtype.itemsize or len(csr.crow_indices) % 8 or len(csr.col_indices) % 8:
        raise bad
    values = np.frombuffer(csr.values, dtype=dtype)
    crow, col = np.frombuffer(csr.crow_indices, dtype="<i8"), np.frombuffer(csr.col_indices, dtype="<i8")
    rows, cols = shape
    if (len(crow) != rows + 1 or crow[0] != 0 or crow[-1] != len(values) or len(col) != len(values)
            or np.any(np.diff(crow) < 0) or np.any((col < 0) | (col >= cols))):
        raise bad
    dense = np.zeros((rows, cols), dtype=dtype)
    dense[np.repeat(np.arange(rows), np.diff(crow)), col] = values
    return dense.tobytes()


def forward_backward_output(result: types_pb2.ForwardBackwardResult) -> tpb.ForwardBackwardOutput:
    """Per-datum outputs batched into ArrayRecords (one per run of datums whose fields
    share dtype and trailing shape), byte offsets as int64."""
    out = tpb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", metrics=dict(result.metrics))
    for group in _uniform_runs(result.outputs):
        record = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(group))
        for name in group[0].loss_fn_outputs:
            tensors = [d.loss_fn_outputs[name] for d in group]
            offsets = np.cumsum([0] + [len(t.data) for t in tensors], dtype=np.int64)
            record.fields[name].CopyFrom(tpb.BatchedTensor(
                data=b"".join(t.data for t in tensors), offsets=offsets.astype("<i8").tobytes(),
                dtype=tensors[0].dtype, trailing_shape=list(tensors[0].shape[1:])))
    return out


def _layout(output: types_pb2.DatumOutput) -> tuple:
    return tuple(sorted((k, t.dtype, tuple(t.shape[1:])) for k, t in output.loss_fn_outputs.items()))


def _uniform_runs(outputs: Sequence[types_pb2.DatumOutput]) -> list[list[types_pb2.DatumOutput]]:
    groups: list[list[types_pb2.DatumOutput]] = []
    for output in outputs:
        if groups and _layout(groups[-1][0]) == _layout(output):
            groups[-1].append(output)
        else:
            groups.append([output])
    return groups


def forward_backward_json(output: tpb.ForwardBackwardOutput) -> dict[str, Any]:
    """The JSON form of a ForwardBackwardOutput (for a client that does not accept protobuf)."""
    datums: list[dict[str, Any]] = []
    for record in output.loss_fn_outputs:
        rows: list[dict[str, Any]] = [{} for _ in range(record.num_datums)]
        for name, batched in record.fields.items():
            item = _ITEM[batched.dtype]
            values = np.frombuffer(batched.data, dtype=item)
            if batched.dtype == tpb.DTYPE_BFLOAT16:
                values = (values.astype(np.uint32) << 16).view(np.float32)
            offsets = np.frombuffer(batched.offsets, dtype="<i8") // item.itemsize
            trailing = list(batched.trailing_shape)
            is_float = batched.dtype in (tpb.DTYPE_FLOAT32, tpb.DTYPE_BFLOAT16)
            for i, row in enumerate(rows):
                part = values[offsets[i]:offsets[i + 1]]
                shape = [part.size // max(math.prod(trailing), 1), *trailing]
                row[name] = {"data": part.tolist(), "dtype": "float32" if is_float else "int64", "shape": shape}
        datums += rows
    return {"loss_fn_output_type": output.loss_fn_output_type, "metrics": dict(output.metrics),
            "loss_fn_outputs": datums}


# -- sampling ------------------------------------------------------------------------

def check_sample_request(request: tt.SampleRequest) -> None:
    """Refuse, before anything runs, what tunemesh cannot sample."""
    for what, asked in (("topk_prompt_logprobs", request.topk_prompt_logprobs),
                        ("topk_sample_logprobs", request.topk_sample_logprobs),
                        ("target_prompt_logprobs", request.target_prompt_logprobs is not None),
                        ("prompt_alt_tokens_k", request.prompt_alt_tokens_k)):
        if asked:
            raise Unsupported(what)
    if request.sampling_session_id is None:
        raise Unsupported("asample without sampling_session_id")
    stop = request.sampling_params.stop
    if stop is not None and not isinstance(stop, str) and len(stop) == 0:
        raise Unsupported("stop=[] (tunemesh always stops at the end-of-sequence token)")


def prompt(model_input: tt.ModelInput) -> types_pb2.ModelInput:
    out = types_pb2.ModelInput()
    for chunk in model_input.chunks:
        if not isinstance(chunk, tt.EncodedTextChunk):
            raise Unsupported(f"{getattr(chunk, 'type', type(chunk).__name__)} chunks in a prompt")
        out.chunks.add().encoded_text.tokens.extend(chunk.tokens)
    return out


def sampling_params(params: tt.SamplingParams, max_tokens: int) -> sampling_pb2.SamplingParams:
    """Tinker's params: top_k -1 is 0 (no limit), a stop string stays in the output, stop
    is a string, strings or token ids; `max_tokens` 0 (Tinker's None) samples up to the context limit."""
    out = sampling_pb2.SamplingParams(max_tokens=max_tokens, temperature=params.temperature, include_stop_str=True,
                                      top_p=params.top_p, top_k=max(params.top_k, 0))
    stop = params.stop
    if isinstance(stop, str):
        out.stop.append(stop)
    elif stop:
        if all(isinstance(s, int) for s in stop):
            out.stop_token_ids.extend(stop)
        else:
            out.stop.extend(str(s) for s in stop)
    if params.seed is not None:
        out.seed = params.seed
    return out


def sample_response(sequences: Iterable[sampling_pb2.SampledSequence], prompt_logprobs: Sequence[float] | None,
                    prompt_len: int, last_n: int | None = None) -> tpb.SampleResponse:
    """Tinker's SampleResponse: int32/float32 bytes; prompt logprobs as len(prompt) floats
    with NaN at position 0 (and before the last `last_n`)."""
    out = tpb.SampleResponse()
    for seq in sequences:
        stop = tpb.STOP_REASON_LENGTH if seq.stop_reason == sampling_pb2.STOP_REASON_LENGTH else tpb.STOP_REASON_STOP
        out.sequences.add(stop_reason=stop, tokens=np.asarray(seq.tokens, dtype="<i4").tobytes(),
                          logprobs=np.asarray(seq.logprobs, dtype=_FLOAT32).tobytes())
    if prompt_logprobs is not None:
        out.prompt_logprobs = padded_prompt_logprobs(prompt_logprobs, prompt_len, last_n).tobytes()
    return out


def padded_prompt_logprobs(logprobs: Sequence[float], prompt_len: int, last_n: int | None) -> np.ndarray:
    """tunemesh's N-1 logprobs (tokens 1..N-1) as N floats, NaN where none is asked for."""
    if len(logprobs) != max(prompt_len - 1, 0):
        raise ValueError(f"{len(logprobs)} prompt logprobs for a prompt of {prompt_len} tokens")
    padded = np.full(prompt_len, np.nan, dtype=_FLOAT32)
    padded[1:] = np.asarray(logprobs, dtype=_FLOAT32)
    if last_n is not None:
        padded[: max(prompt_len - last_n, 0)] = np.nan
    return padded


def sample_json(response: tpb.SampleResponse) -> dict[str, Any]:
    """The JSON form (for a client that does not accept protobuf)."""
    def floats(raw: bytes) -> list[float | None]:
        return [None if math.isnan(v) else v for v in np.frombuffer(raw, dtype=_FLOAT32).tolist()]

    seqs = [{"stop_reason": "length" if s.stop_reason == tpb.STOP_REASON_LENGTH else "stop",
             "tokens": np.frombuffer(s.tokens, dtype="<i4").tolist(), "logprobs": floats(s.logprobs)}
            for s in response.sequences]
    body: dict[str, Any] = {"sequences": seqs, "type": "sample"}
    if response.prompt_logprobs:
        body["prompt_logprobs"] = floats(response.prompt_logprobs)
    return body


# -- catalog -------------------------------------------------------------------------

def iso(ts: Timestamp) -> str:
    return ts.ToDatetime(tzinfo=datetime.timezone.utc).isoformat()


def checkpoint(ck: checkpoints_pb2.Checkpoint, training_run_id: str) -> dict[str, Any]:
    """Tinker's Checkpoint of `ck`, whose run Tinker calls `training_run_id`."""
    path = tinker_path(ck.path, training_run_id)
    body: dict[str, Any] = {
        "checkpoint_id": path.checkpoint_id, "checkpoint_type": CHECKPOINT_TYPE[path.kind],
        "time": iso(ck.create_time), "tinker_path": str(path), "size_bytes": ck.size_bytes, "public": False,
        "user_metadata": dict(ck.user_metadata) or None,
    }
    if ck.HasField("expire_time"):
        body["expires_at"] = iso(ck.expire_time)
    return body


def training_run(run: training_pb2.TrainingRun, training_run_id: str) -> dict[str, Any]:
    """Tinker's TrainingRun: its owner is the run's tenant; its last request time the
    scheduler's (the creation time from a scheduler that reports none)."""
    last = run.last_request_time if run.HasField("last_request_time") else run.create_time
    return {"training_run_id": training_run_id, "base_model": run.base_model, "model_owner": run.owner,
            "is_lora": True, "corrupted": False, "lora_rank": run.lora_config.rank,
            "last_request_time": iso(last), "user_metadata": user_labels(run.user_metadata)}


def weights_info(ck: checkpoints_pb2.Checkpoint) -> dict[str, Any]:
    lora = ck.lora_config
    return {"base_model": ck.base_model, "is_lora": True, "lora_rank": lora.rank, "train_unembed": lora.train_unembed,
            "train_mlp": lora.train_mlp, "train_attn": lora.train_attn, "optimizer_config": {"type": "adamw"}}


def get_info(run: training_pb2.TrainingRun, model: str) -> dict[str, Any]:
    """`get_info`: the tokenizer is named by the base model (the HF cache is seeded with it)."""
    return {"type": "get_info", "model_id": model, "is_lora": True, "lora_rank": run.lora_config.rank,
            "model_name": run.base_model, "optimizer_config": {"type": "adamw"},
            "model_data": {"model_name": run.base_model, "tokenizer_id": run.base_model}}
