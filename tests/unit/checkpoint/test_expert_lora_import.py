"""PEFT imports of adapters with LoRA on fused MoE expert weights (`target_parameters`)."""

from __future__ import annotations

import json
import pathlib

import pytest

from tunemesh_checkpoint.catalog import CheckpointCatalog
from tunemesh_checkpoint.store import FilesystemStore
from tunemesh_common.lora import peft_format
from tunemesh.errors import InvalidArgumentError, NotFoundError

CONFIG, WEIGHTS = peft_format.CONFIG_FILE, peft_format.WEIGHTS_FILE
BASE = "tunemesh/tiny-moe"
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.fixture(scope="module")
def expert_peft_dir(tmp_path_factory) -> pathlib.Path:
    """A real PEFT adapter (r=2 on q_proj and both expert weights) of a tiny Qwen3-MoE."""
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=16, intermediate_size=64,
                                         moe_intermediate_size=16, num_experts=3, num_experts_per_tok=2)
    base = transformers.AutoModelForCausalLM.from_config(config)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS)
    out = tmp_path_factory.mktemp("expert_peft_adapter")
    peft.get_peft_model(base, lora).save_pretrained(out)
    return out


@pytest.fixture
def files(expert_peft_dir) -> dict[str, bytes]:
    return {name: (expert_peft_dir / name).read_bytes() for name in (CONFIG, WEIGHTS)}


@pytest.fixture
def catalog(tmp_path) -> CheckpointCatalog:
    return CheckpointCatalog(FilesystemStore(tmp_path / "store", fsync=False))


def test_an_expert_adapter_imports_with_train_experts_and_a_normalized_config(catalog, files):
    record = catalog.import_peft("alice", "moe", BASE, files)
    assert record.lora == {"rank": 2, "alpha": 4.0, "train_attn": True, "train_mlp": False, "train_unembed": False,
                           "train_experts": True, "seed": 0}
    _, chunks = catalog.read("alice", "tunemesh://imports/moe")
    stored: dict[str, bytes] = {}
    for name, _, chunk in chunks:
        stored[name] = stored.get(name, b"") + chunk
    assert stored[WEIGHTS] == files[WEIGHTS]
    config = json.loads(stored[CONFIG])
    assert (config["target_modules"], config["target_parameters"]) == (["q_proj"], sorted(EXPERTS))
    assert peft_format.parse_config(stored[CONFIG]).target_parameters == tuple(sorted(EXPERTS))


def _with_config(files: dict[str, bytes], **changes) -> dict[str, bytes]:
    return {**files, CONFIG: json.dumps(json.loads(files[CONFIG]) | changes).encode()}


@pytest.mark.parametrize("changes, reason", [
    ({"target_parameters": ["experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight"]},
     "UNSUPPORTED_TARGET_PARAMETER"),
    ({"target_parameters": ["experts.down_proj"]}, "UNSUPPORTED_TARGET_PARAMETER"),
    ({"target_parameters": None}, "BAD_ADAPTER_WEIGHTS"),
    ({"r": 4}, "BAD_ADAPTER_WEIGHTS"),
], ids=["router", "one-expert-weight", "undeclared-expert-factors", "rank-mismatch"])
def test_bad_expert_adapters_are_refused(catalog, files, changes, reason):
    with pytest.raises(InvalidArgumentError) as err:
        catalog.import_peft("alice", "bad", BASE, _with_config(files, **changes))
    assert err.value.reason == reason
    with pytest.raises(NotFoundError):
        catalog.get("alice", "tunemesh://imports/bad")
