"""What a TrainingClient takes and returns."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from tunemesh.types.tensor_data import TensorData

LossFnType = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo"]
"""The losses the service computes (its loss catalogue). Tinker's `stable_reinforce` and
`custom` are not among them; `TrainingClient.forward_backward_custom` computes a custom
loss on the client."""


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
class ModelData:
    """Tinker-style model description inside GetInfoResponse."""

    model_name: str
    arch: str | None = None
    tokenizer_id: str | None = None


@dataclasses.dataclass(frozen=True)
class GetInfoResponse:
    """A training run as the service reports it (also what `RestClient.get_training_run`
    returns in place of Tinker's TrainingRun: `training_run_id`, `base_model`,
    `lora_rank`, `is_lora` and `user_metadata` read the same)."""

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
    def training_run_id(self) -> str:
        """The run's name, `runs/{id}` (Tinker's name for `model_id`)."""
        return self.model_id

    @property
    def lora_rank(self) -> int:
        return self.lora_config.rank
