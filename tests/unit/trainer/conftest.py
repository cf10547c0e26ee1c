"""Tiny random Qwen3 / Qwen3-MoE checkpoints built in the test, offline."""

from __future__ import annotations

import os
import pathlib

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
)


def _save(config, path: pathlib.Path) -> pathlib.Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dense_dir(tmp_path_factory) -> pathlib.Path:
    from transformers import Qwen3Config

    return _save(Qwen3Config(**COMMON), tmp_path_factory.mktemp("tiny_dense"))


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory) -> pathlib.Path:
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        **COMMON, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1]
    )
    return _save(config, tmp_path_factory.mktemp("tiny_moe"))
