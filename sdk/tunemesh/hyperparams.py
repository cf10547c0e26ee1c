"""Learning rates for LoRA by model size and rank (provisional; calibrated below)."""

from __future__ import annotations

HIDDEN_SIZES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": 576,
    "tunemesh/tiny-dense": 64,
    "tunemesh/tiny-moe": 64,
}
REFERENCE_HIDDEN = 576
REFERENCE_LR = 5e-4  # at alpha 32
WIDTH_EXPONENT = 0.73


def lora_learning_rate(model: str | int, rank: int = 32, alpha: float | None = None) -> float:
    hidden = model if isinstance(model, int) else HIDDEN_SIZES[model]
    alpha = float(rank if alpha is None else alpha)
    return REFERENCE_LR * (REFERENCE_HIDDEN / hidden) ** WIDTH_EXPONENT * 32.0 / alpha
