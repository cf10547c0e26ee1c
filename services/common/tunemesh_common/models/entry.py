"""What the registry knows about a model without loading it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tunemesh.errors import InvalidArgumentError

DENSE = "dense"
MOE = "moe"
FAMILIES = (DENSE, MOE)
MAX_LORA_RANK = {DENSE: 128, MOE: 32}
MAX_SEQ_LEN_CAP = 8192
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
_EXPERT_TARGETS = ("experts.gate_up_proj", "experts.down_proj")


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A registered base model.

    `lora_target_modules` are linear module names (PEFT `target_modules`);
    `lora_target_parameters` are fused 3-D expert weights (PEFT `target_parameters`).
    `local_path` is set for directories registered by configuration; built-ins are
    materialised under the registry's data dir.
    """

    name: str
    family: str
    architecture: str
    vocab_size: int
    max_seq_len: int
    max_lora_rank: int
    lora_target_modules: tuple[str, ...]
    lora_target_parameters: tuple[str, ...] = ()
    local_path: Path | None = None


def lora_targets(family: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Default (target_modules, target_parameters) of a family."""
    if family == MOE:
        return _ATTENTION_TARGETS, _EXPERT_TARGETS
    return _ATTENTION_TARGETS + _MLP_TARGETS, ()


def make_entry(name: str, family: str, architecture: str, vocab_size: int,
               max_position_embeddings: int, local_path: Path | None = None) -> ModelEntry:
    """An entry with the family's LoRA defaults and the capped sequence length."""
    if family not in FAMILIES:
        raise InvalidArgumentError("INVALID_MODEL_FAMILY", f"{name}: family {family!r} not in {FAMILIES}")
    modules, parameters = lora_targets(family)
    return ModelEntry(
        name=name,
        family=family,
        architecture=architecture,
        vocab_size=vocab_size,
        max_seq_len=min(max_position_embeddings, MAX_SEQ_LEN_CAP),
        max_lora_rank=MAX_LORA_RANK[family],
        lora_target_modules=modules,
        lora_target_parameters=parameters,
        local_path=local_path,
    )


def detect_family(config: dict) -> str:
    """`moe` when an HF config declares experts, else `dense`."""
    config = config.get("text_config", config)
    return MOE if any((config.get(key) or 0) > 0 for key in _EXPERT_COUNT_KEYS) else DENSE


def entry_for_local_dir(name: str, path: Path, family: str | None = None) -> ModelEntry:
    """Describe a local HF checkpoint directory; family is detected unless given."""
    path = Path(path).expanduser().resolve()
    config = _read_config(name, path)
    for required in ("tokenizer.json",):
        if not (path / required).is_file():
            raise InvalidArgumentError("INVALID_MODEL_DIR", f"{name}: {path} has no {required}")
    if not any(path.glob("*.safetensors")):
        raise InvalidArgumentError("INVALID_MODEL_DIR", f"{name}: {path} has no *.safetensors")
    text_config = config.get("text_config", config)
    return make_entry(
        name=name,
        family=family or detect_family(config),
        architecture=(config.get("architectures") or ["unknown"])[0],
        vocab_size=int(text_config["vocab_size"]),
        max_position_embeddings=int(text_config.get("max_position_embeddings", MAX_SEQ_LEN_CAP)),
        local_path=path,
    )


def _read_config(name: str, path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InvalidArgumentError("INVALID_MODEL_DIR", f"{name}: {path} has no config.json")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError("INVALID_MODEL_DIR", f"{name}: unreadable {config_path}: {exc}") from exc
    if "vocab_size" not in config.get("text_config", config):
        raise InvalidArgumentError("INVALID_MODEL_DIR", f"{name}: {config_path} has no vocab_size")
    return config
