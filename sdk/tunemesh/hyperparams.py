"""A starting learning rate for LoRA by model width, rank and alpha.

    lr = 1e-3 * (576 / hidden_size) * sqrt(32 / alpha)      (alpha defaults to the rank)

Where the numbers come from:
- **width**: AdamW's best rate for hidden matrices falls as 1 / width (the muP rule of
  Yang et al., "Tensor Programs V", 2022); hidden_size 576 is SmolLM2-135M's.
- **alpha**: LoRA scales its update by alpha / rank; at a fixed alpha the best rate is
  nearly independent of the rank (Schulman et al., "LoRA Without Regret", Thinking
  Machines, 2025, with alpha = 32). tunemesh's default alpha is the rank, so the rate
  must fall as alpha grows; our sweep measured it falling as about alpha^-0.5 (not
  alpha^-1) over short runs, and that is what the formula uses.
- **the constant and the exponent**: `bench/lr_sweep.py` (12 SFT steps, batch 8, on
  the cookbook's extraction task; `bench/results/lr_sweep_*.json`). SmolLM2-135M-Instruct,
  held-out NLL per token after 12 steps at lr 3e-4 / 1e-3 / 3e-3 / 1e-2:
  rank 4 (alpha 4): 0.76 / 0.17 / 0.11 / 0.21, best 3e-3 (formula 2.8e-3);
  rank 32 (alpha 32): 0.14 / 0.09 / 0.20 / 1.26, best 1e-3 (formula 1e-3).
  The random-init tunemesh/tiny-dense (hidden 64), 16 steps, rates 1e-4..3e-2: best
  3e-2 at rank 4 (formula 2.5e-2), 1e-2..3e-2 at rank 16 (1.3e-2), 3e-3..1e-2 at rank 64
  (6.4e-3).
It is a starting point for short runs: sweep a factor of 3 either way for long ones.
"""

from __future__ import annotations

import math

HIDDEN_SIZES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": 576,
    "tunemesh/tiny-dense": 64,
    "tunemesh/tiny-moe": 64,
}
REFERENCE_LR = 1e-3
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
    return REFERENCE_LR * (REFERENCE_HIDDEN / hidden) * math.sqrt(REFERENCE_ALPHA / alpha)
