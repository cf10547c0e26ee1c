"""The one frozen-base loader of the torch engines: dtype, freezing, the wrapped LoRA targets."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from tunemesh.errors import InvalidArgumentError  # noqa: E402
from tunemesh_common.lora.frozen_base import load_frozen_base  # noqa: E402
from tunemesh_common.lora.multi_lora import MultiLoraExperts, MultiLoraLinear  # noqa: E402


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, intermediate_size=64, moe_intermediate_size=16,
                            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_moe")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_the_base_is_frozen_in_its_dtype_with_every_target_wrapped(tiny_moe_dir):
    base = load_frozen_base(tiny_moe_dir, "bfloat16", torch.device("cpu"))
    assert not base.model.training and base.vocab_size == 128
    assert all(not p.requires_grad for p in base.model.parameters())
    assert {p.dtype for p in base.model.parameters()} == {torch.bfloat16}
    assert set(base.groups.values()) == {"attn", "mlp", "unembed", "experts"}
    for name in base.linears:
        assert isinstance(base.model.get_submodule(name), MultiLoraLinear)
        assert base.model.get_submodule(name).routing is base.routing
    (experts_name,) = base.experts
    assert isinstance(base.model.get_submodule(experts_name), MultiLoraExperts) and base.has_fused_experts
    assert base.groups[f"{experts_name}.gate_up_proj"] == "experts"


def test_targets_give_their_shapes_and_factor_tables(tiny_moe_dir):
    base = load_frozen_base(tiny_moe_dir, "float32", torch.device("cpu"))
    q_proj = "model.layers.0.self_attn.q_proj"
    assert base.target_shape(q_proj) == (32, 32, 1)
    assert base.pair_table(q_proj) is base.linears[q_proj].pairs
    (experts_name,) = base.experts
    assert base.target_shape(f"{experts_name}.gate_up_proj") == (32, 32, 4)  # (hidden, 2 * moe_intermediate, E)
    assert base.target_shape(f"{experts_name}.down_proj") == (16, 32, 4)
    assert base.pair_table(f"{experts_name}.down_proj") is base.experts[experts_name].pairs["down_proj"]
    with pytest.raises(KeyError):
        base.pair_table("model.layers.0.self_attn")


def test_an_unknown_dtype_is_refused_before_loading(tmp_path):
    with pytest.raises(InvalidArgumentError) as err:
        load_frozen_base(tmp_path / "absent", "float16", torch.device("cpu"))
    assert err.value.reason == "BAD_DTYPE"


def test_every_weight_is_loaded_into_aligned_memory_with_its_values(tiny_moe_dir):
    """safetensors leaves tensors at 8-byte offsets; oneDNN read such weights at half speed
    in the input gradients' GEMMs. The loader gives each its own 64-byte-aligned copy."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32)  # the file's own dtype
    assert any(p.data_ptr() % 64 for p in plain.parameters())  # what the loader starts from
    base = load_frozen_base(tiny_moe_dir, "float32", torch.device("cpu"))
    assert all(p.data_ptr() % 64 == 0 for p in base.model.parameters())
    loaded = {name.replace(".base.", "."): p for name, p in base.model.named_parameters()}
    expected = dict(plain.named_parameters())
    assert loaded.keys() == expected.keys()
    for name, param in expected.items():
        assert torch.equal(loaded[name], param), name
