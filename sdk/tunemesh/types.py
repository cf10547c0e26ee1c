"""User-facing data types, named after Tinker's so cookbook-style code ports as is.

Plain dataclasses over numpy; torch is imported only by the `*_torch` methods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

DTYPES = ("float32", "int64", "int32")
"""Element types a TensorData holds (the wire's bfloat16 arrives widened to float32)."""

_INT64_KEYS = frozenset({"target_tokens"})
_FLOAT32_KEYS = frozenset(
    {
        "weights",
        "advantages",
        "logprobs",
        "clip_low_threshold",
        "clip_high_threshold",
        "sequence_ratio_mask",
    }
)


class TensorData:
    """A dense tensor: dtype name, shape and row-major elements (held as a numpy array)."""

    __slots__ = ("_array",)

    def __init__(
        self, data: Sequence[Any] | np.ndarray, dtype: str, shape: Sequence[int] | None = None
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; expected one of {DTYPES}")
        array = np.asarray(data, dtype=dtype)
        if shape is not None:
            array = array.reshape(tuple(int(d) for d in shape))
        self._array = array

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        """Wrap an array; floats become float32, integers int64 (int32 is kept), bools float32."""
        array = np.asarray(array)
        return cls(array, _dtype_for_array(array))

    @classmethod
    def from_torch(cls, tensor: Any) -> TensorData:
        """Copy a torch tensor (any device; bfloat16/float16/float64 become float32)."""
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        return cls.from_numpy(tensor.numpy())

    @property
    def dtype(self) -> str:
        return self._array.dtype.name

    @property
    def shape(self) -> list[int]:
        return list(self._array.shape)

    @property
    def data(self) -> list[Any]:
        """The elements, flattened, as Python numbers."""
        return self._array.reshape(-1).tolist()

    def to_numpy(self) -> np.ndarray:
        return self._array.copy()

    def to_torch(self) -> Any:
        import torch

        return torch.from_numpy(self.to_numpy())

    def tolist(self) -> list[Any]:
        """The elements nested by shape."""
        return self._array.tolist()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorData):
            return NotImplemented
        return self.dtype == other.dtype and np.array_equal(self._array, other._array)

    __hash__ = None  # mutable-by-content, like a list

    def __repr__(self) -> str:
        return f"TensorData(dtype={self.dtype!r}, shape={self.shape})"


@dataclasses.dataclass(frozen=True)
class EncodedTextChunk:
    """A run of token ids."""

    tokens: Sequence[int]
    type: str = "encoded_text"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", [int(t) for t in self.tokens])

    @property
    def length(self) -> int:
        return len(self.tokens)


ModelInputChunk = EncodedTextChunk


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """The tokens a model reads: the concatenation of its chunks."""

    chunks: Sequence[ModelInputChunk] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunks", list(self.chunks))

    @classmethod
    def from_ints(cls, tokens: Iterable[int]) -> ModelInput:
        return cls([EncodedTextChunk(list(tokens))])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls([])

    def to_ints(self) -> list[int]:
        return [t for chunk in self.chunks for t in chunk.tokens]

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: ModelInputChunk) -> ModelInput:
        """A new ModelInput with `chunk` added at the end."""
        return ModelInput([*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        """A new ModelInput with one token added to the last text chunk."""
        if self.chunks and isinstance(self.chunks[-1], EncodedTextChunk):
            last = EncodedTextChunk([*self.chunks[-1].tokens, int(token)])
            return ModelInput([*self.chunks[:-1], last])
        return self.append(EncodedTextChunk([int(token)]))


LossFnInput = Any  # TensorData, a (nested) list, a numpy array or a torch tensor


@dataclasses.dataclass
class Datum:
    """One example: a model input and the named tensors its loss reads.

    Lists are converted by key (`target_tokens` -> int64; `weights`, `advantages`,
    `logprobs`, ... -> float32); numpy arrays and torch tensors keep their kind.
    """

    model_input: ModelInput
    loss_fn_inputs: Mapping[str, LossFnInput] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.loss_fn_inputs = {
            str(key): to_tensor_data(key, value) for key, value in self.loss_fn_inputs.items()
        }


def to_tensor_data(key: str, value: LossFnInput) -> TensorData:
    """Convert one loss input to TensorData, choosing list dtypes by key like Tinker."""
    if isinstance(value, TensorData):
        return value
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if _is_torch_tensor(value):
        return TensorData.from_torch(value)
    if key in _INT64_KEYS:
        return TensorData(value, "int64")
    if key in _FLOAT32_KEYS:
        return TensorData(value, "float32")
    return TensorData.from_numpy(np.asarray(value))


@dataclasses.dataclass(frozen=True)
class AdamParams:
    """AdamW hyper-parameters (decoupled weight decay; grad_clip_norm 0 disables clipping)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which parts of the base model get LoRA; alpha None means alpha = rank."""

    rank: int = 32
    alpha: float | None = None
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True
    train_experts: bool = False


@dataclasses.dataclass
class ForwardBackwardOutput:
    """Result of forward / forward_backward: per-datum outputs and `name:reduction` metrics."""

    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float]
    loss_fn_output_type: str = "TensorData"


@dataclasses.dataclass
class OptimStepResponse:
    """Result of optim_step."""

    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SaveWeightsResponse:
    """Result of save_state: the checkpoint's path (`tunemesh://runs/{run}/state/{name}`)."""

    path: str
    checkpoint: Any = None  # tunemesh.Checkpoint: files, sizes, step, expiry


@dataclasses.dataclass(frozen=True)
class SaveWeightsForSamplerResponse:
    """Result of save_weights_for_sampler: `tunemesh://runs/{run}/sampler/{name}`."""

    path: str
    checkpoint: Any = None  # tunemesh.Checkpoint


@dataclasses.dataclass(frozen=True)
class LoadWeightsResponse:
    """Result of load_state: the checkpoint loaded and the run's optimizer step count."""

    path: str
    step: int = 0


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. `max_tokens` None: up to the model's context limit. `stop` takes
    strings (cut from the text unless `include_stop_str`) or token ids (kept);
    temperature 0 is greedy; top_k 0 or -1 and top_p 1 disable those filters."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: str | Sequence[str] | Sequence[int] | None = None
    seed: int | None = None
    include_stop_str: bool = False


@dataclasses.dataclass(frozen=True)
class SampledSequence:
    """One continuation: its new tokens, their logprobs, why it ended ("length" or "stop")
    and its id (distinct for every sequence the service returns)."""

    tokens: list[int]
    logprobs: list[float]
    stop_reason: str
    sequence_id: str = ""


@dataclasses.dataclass(frozen=True)
class SampleResponse:
    """Result of SamplingClient.sample; `prompt_logprobs` (first None) when asked for."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None


@dataclasses.dataclass(frozen=True)
class SupportedModel:
    """A base model the service can train on."""

    model_name: str
    family: str = ""
    vocab_size: int = 0
    max_seq_len: int = 0
    max_lora_rank: int = 0


@dataclasses.dataclass(frozen=True)
class GetServerCapabilitiesResponse:
    """Models served now and the per-request limits."""

    supported_models: list[SupportedModel]
    max_datums: int = 0
    max_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class ModelData:
    """Tinker-style model description inside GetInfoResponse."""

    model_name: str
    arch: str | None = None
    tokenizer_id: str | None = None


@dataclasses.dataclass(frozen=True)
class GetInfoResponse:
    """A training run as the service reports it."""

    model_id: str
    model_data: ModelData
    lora_config: LoraConfig
    step: int = 0
    last_seq_id: int = 0
    is_lora: bool = True
    trainer_node: str = ""  # the trainer holding the run's adapter now (it moves if that one fails)
    user_metadata: dict[str, str] = dataclasses.field(default_factory=dict)  # as given at creation

    @property
    def model_name(self) -> str:
        """The base model name."""
        return self.model_data.model_name

    base_model = model_name

    @property
    def lora_rank(self) -> int:
        return self.lora_config.rank


def _dtype_for_array(array: np.ndarray) -> str:
    kind = array.dtype.kind
    if kind in "fb":
        return "float32"
    if array.dtype == np.int32:
        return "int32"
    if kind in "iu":
        return "int64"
    raise TypeError(f"cannot make a tensor from numpy dtype {array.dtype}")


def _is_torch_tensor(value: Any) -> bool:
    module = type(value).__module__
    return module.startswith("torch") and hasattr(value, "detach")
