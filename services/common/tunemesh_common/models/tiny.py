"""Built-in tiny models for tests: Qwen3 (dense) and Qwen3-MoE, random init from a seed.

Both share the tiny byte-level BPE tokenizer. Building twice gives bit-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunemesh_common.models import tokenizer

SEED = 1234
MAX_POSITION_EMBEDDINGS = 512

_COMMON = dict(
    vocab_size=tokenizer.VOCAB_SIZE,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=MAX_POSITION_EMBEDDINGS,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=0,
    pad_token_id=0,
)


def dense_config():
    """The tiny dense model's `Qwen3Config`."""
    from transformers import Qwen3Config

    return Qwen3Config(intermediate_size=128, **_COMMON)


def moe_config():
    """The tiny MoE model's `Qwen3MoeConfig` (fused 3-D experts: 4 experts, top 2)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        intermediate_size=128,
        moe_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        **_COMMON,
    )


def _save_model(config, directory: Path, experts_implementation: str | None = None) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(directory), safe_serialization=True)
    if experts_implementation is not None:
        _pin_experts_implementation(directory / "config.json", experts_implementation)
    tokenizer.save_tiny_tokenizer(directory)


def _pin_experts_implementation(config_path: Path, implementation: str) -> None:
    """Record the experts kernel in config.json (save_pretrained drops it).

    `from_pretrained(..., experts_implementation=...)` still overrides it.
    """
    config = json.loads(config_path.read_text())
    config["experts_implementation"] = implementation
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_dense(directory: Path) -> None:
    """Write the tiny dense model (weights, config, tokenizer) into `directory`."""
    _save_model(dense_config(), directory)


def build_moe(directory: Path) -> None:
    """Write the tiny MoE model (weights, config, tokenizer) into `directory`.

    Its config pins the `eager` experts kernel: `grouped_mm` is far slower on CPU.
    """
    _save_model(moe_config(), directory, experts_implementation="eager")
