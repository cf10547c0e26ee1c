"""A starting learning rate for LoRA by model width, rank and alpha.

    lr = 5e-4 * (576 / hidden_size) * (32 / alpha)      (alpha defaults to the rank)

Where the numbers come from:
- **alpha**: LoRA multiplies its update by alpha / rank. With a fixed alpha the best
  learning rate is nearly independent of the rank (Schulman et al., "LoRA Without
  Regret", Thinking Machines, 2025, who fix alpha = 32); under AdamW the update's size
  then scales with alpha, so the rate goes as 1 / alpha. tunemesh's default alpha is the
  rank, so a rank-4 run gets 8x the rate of a rank-32 run.
- **width**: AdamW's best rate for hidden matrices falls as 1 / width (the muP rule of
  Yang et al., "Tensor Programs V", 2022); hidden_size 576 is SmolLM2-135M's.
- **the constant 5e-4**: our sweep, `bench/lr_sweep.py` (12 SFT steps on the cookbook's
  extraction task, results in `bench/results/lr_sweep_*.json`). On SmolLM2-135M-Instruct
  at rank 4 (alpha 4) held-out NLL after 12 steps was 0.76 / 0.17 / 0.11 / 0.21 at lr
  3e-4 / 1e-3 / 3e-3 / 1e-2 (formula: 4e-3); at rank 32 lr 3e-4 already gave 0.14
  (formula: 5e-4). On the random-init tunemesh/tiny-dense (hidden 64) the best rates
  were 1e-2..3e-2 at rank 4 and 16 and 3e-3 at rank 64 (formula: 3.6e-2, 9e-3, 2.3e-3).
It is a starting point for short runs: sweep a factor of 3 either way for long ones.
"""

from __future__ import annotations

HIDDEN_SIZES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": 576,
    "tunemesh/tiny-dense": 64,
    "tunemesh/tiny-moe": 64,
}
REFERENCE_LR = 5e-4
REFERENCE_HIDDEN = 576
REFERENCE_ALPHA = 32.0


def lora_learning_rate(model: str | int, rank: int = 32, alpha: float | None = None) -> float:
    """AdamW learning rate for a LoRA run on `model` (a name above, or its hidden size)."""
    if isinstance(model, bool) or not isinstance(model, (str, int)):
        raise TypeError(f"model must be a model name or a hidden size, got {model!r}")
    hidden = HIDDEN_SIZES.get(model) if isinstance(model, str) else model
    if hidden is None:
        raise ValueError(f"unknown hidden size of {model!r}: pass it instead, e.g. lora_learning_rate(4096, rank)")
    if hidden <= 0 or rank <= 0 or (alpha is not None and alpha <= 0):
        raise ValueError("hidden size, rank and alpha must be positive")
    alpha = float(rank if alpha is None else alpha)
    return REFERENCE_LR * (REFERENCE_HIDDEN / hidden) * (REFERENCE_ALPHA / alpha)
