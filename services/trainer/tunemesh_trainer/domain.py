"""Plain data the trainer's layers exchange: no grpc, no torch.

The server converts protos into these; the engine sees only token ids and arrays.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a loaded base model accepts."""

    name: str
    family: str  # "dense" or "moe"
    vocab_size: int
    max_seq_len: int
    max_lora_rank: int


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """One adapter's LoRA configuration."""

    rank: int = 32
    alpha: float = 32.0
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    seed: int = 0
    train_experts: bool = False


@dataclasses.dataclass(frozen=True)
class AdamSpec:
    """AdamW hyper-parameters of one optimizer step (Tinker's defaults)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


class ItemKind(enum.Enum):
    FORWARD = "forward"
    FORWARD_BACKWARD = "forward_backward"


@dataclasses.dataclass
class DatumArrays:
    """One datum: input token ids (N,) and named loss inputs, each (N,) or (N, K)."""

    tokens: np.ndarray  # int64, shape (N,)
    loss_inputs: dict[str, np.ndarray]


@dataclasses.dataclass
class EngineItem:
    """One forward / forward_backward call of one adapter inside a fused batch."""

    item_id: str
    adapter_id: str
    kind: ItemKind
    data: list[DatumArrays]
    loss_fn: str = "cross_entropy"
    loss_config: dict[str, float | str] = dataclasses.field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(int(d.tokens.shape[0]) for d in self.data)


@dataclasses.dataclass
class OptimItem:
    """One adapter's optimizer step inside a batch (applied after the batch's pass)."""

    item_id: str
    adapter_id: str
    adam: AdamSpec
    snapshot: bool = False  # copy the adapter right after the step (ItemOutcome.snapshot)


@dataclasses.dataclass
class ItemFailure:
    """Why one item failed; the other items of its batch are unaffected."""

    code: int  # google.rpc.Code
    reason: str
    message: str


@dataclasses.dataclass
class ItemOutcome:
    """Result of one item: per-datum outputs (e.g. `logprobs`) and metrics, or a failure."""

    item_id: str
    outputs: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    failure: ItemFailure | None = None
    snapshot: AdapterState | None = None  # an optimizer step's copy of its adapter, if asked


@dataclasses.dataclass
class AdapterState:
    """An adapter's persistent state as plain arrays: what a checkpoint holds.

    `weights` maps `<module>.lora_A.weight` / `<module>.lora_B.weight` to float32 arrays
    (A: rank x in, B: out x rank). `optimizer` maps `<weight name>/<key>` to AdamW's
    per-parameter state (`exp_avg`, `exp_avg_sq`, `step`), or is None for weights only.
    """

    spec: LoraSpec
    weights: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray] | None = None
    steps: int = 0
