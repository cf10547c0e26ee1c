"""The built-in tiny dense model (with its tokenizer), random PEFT adapters and the
reference HF / PEFT models they are checked against; built offline, once per session."""

from __future__ import annotations

import os
import pathlib

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_SEQ_LEN = 128
MAX_LORA_RANK = 8
ADAPTER_TARGETS = {
    "a1": (["q_proj", "v_proj", "down_proj"], 4),
    "a2": (["k_proj", "o_proj", "gate_proj", "up_proj", "lm_head"], 8),
}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> pathlib.Path:
    from tunemesh_common.models import TINY_DENSE, ModelRegistry

    return ModelRegistry.default(tmp_path_factory.mktemp("data")).materialize(TINY_DENSE)


def _load_base(model_dir: pathlib.Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _save_random_adapter(model_dir: pathlib.Path, out: pathlib.Path, seed: int, targets: list[str], rank: int):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
    model = get_peft_model(_load_base(model_dir), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)  # PEFT starts B at zero: make the adapter matter
    model.save_pretrained(out, save_embedding_layers=False)  # LoRA factors only


@pytest.fixture(scope="session")
def adapter_dirs(model_dir, tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("adapters")
    for seed, (key, (targets, rank)) in enumerate(ADAPTER_TARGETS.items()):
        _save_random_adapter(model_dir, root / key, seed, targets, rank)
    return {key: root / key for key in ADAPTER_TARGETS}


@pytest.fixture(scope="session")
def reference_models(model_dir, adapter_dirs) -> dict:
    """HF models to check against: None -> the base model, key -> PEFT with that adapter."""
    from peft import PeftModel

    models = {None: _load_base(model_dir)}
    for key, directory in adapter_dirs.items():
        models[key] = PeftModel.from_pretrained(_load_base(model_dir), directory).eval()
    return models


@pytest.fixture(scope="session")
def engine(model_dir, adapter_dirs):
    """The engine under test with a1 and a2 loaded (tests load other keys of their own)."""
    from tunemesh_sampler.engine import build_torch_engine

    built = build_torch_engine(
        model_dir, name="tiny", family="dense", max_lora_rank=MAX_LORA_RANK, max_seq_len=MAX_SEQ_LEN
    )
    for key, directory in adapter_dirs.items():
        built.load_adapter(key, directory)
    yield built
    built.close()
