"""peft_format.py on LoRA over fused MoE expert weights (PEFT `target_parameters`)."""

from __future__ import annotations

import json

import pytest

from tunemesh_common.lora import peft_format
from tunemesh.errors import InvalidArgumentError
from tunemesh_common.lora.peft_format import TensorHeader

EXPERTS = ["experts.down_proj", "experts.gate_up_proj"]
LAYER = "model.layers.0.mlp.experts"


def _config(**overrides) -> bytes:
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
              "target_parameters": EXPERTS} | overrides
    return json.dumps(config).encode()


def _expect_invalid(reason: str, call, *args):
    with pytest.raises(InvalidArgumentError) as err:
        call(*args)
    assert err.value.reason == reason
    return err.value


# --- parse_config ----------------------------------------------------------------------


def test_parse_config_accepts_both_expert_weights_in_either_order():
    for parameters in (EXPERTS, EXPERTS[::-1]):
        config = peft_format.parse_config(_config(target_parameters=parameters))
        assert config.target_parameters == ("experts.down_proj", "experts.gate_up_proj")
        assert (config.rank, config.alpha, config.target_modules) == (4, 8.0, ("q_proj",))


def test_parse_config_of_a_built_expert_config_and_of_a_plain_one():
    modules = [f"{LAYER}.gate_up_proj", f"{LAYER}.down_proj", "model.layers.0.self_attn.q_proj"]
    built = peft_format.parse_config(json.dumps(peft_format.build_config("m", 4, 8.0, modules)).encode())
    assert built.target_parameters == tuple(EXPERTS) and built.target_modules == ("q_proj",)
    plain = peft_format.parse_config(_config(target_parameters=None))
    assert plain.target_parameters == ()
    assert peft_format.parse_config(_config(target_parameters=[])).target_parameters == ()


def test_parse_config_accepts_a_real_peft_expert_config():
    peft = pytest.importorskip("peft")
    for targets in (["q_proj"], None):  # PEFT writes null target_modules for experts alone
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, target_parameters=EXPERTS).to_dict()
        raw = json.dumps({k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}).encode()
        parsed = peft_format.parse_config(raw)
        assert parsed.target_parameters == tuple(EXPERTS)
        assert parsed.target_modules == tuple(targets or ())


@pytest.mark.parametrize("parameters, reason", [
    pytest.param(["experts.gate_up_proj"], "UNSUPPORTED_TARGET_PARAMETER", id="gate-up-alone"),
    pytest.param(["experts.down_proj"], "UNSUPPORTED_TARGET_PARAMETER", id="down-alone"),
    pytest.param([*EXPERTS, "self_attn.q_proj.weight"], "UNSUPPORTED_TARGET_PARAMETER", id="a-linear-weight"),
    pytest.param(["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], "UNSUPPORTED_TARGET_PARAMETER",
                 id="longer-names"),
    pytest.param(["experts.gate_proj", "experts.down_proj"], "UNSUPPORTED_TARGET_PARAMETER", id="unknown-weight"),
    pytest.param(["embed_tokens.weight"], "UNSUPPORTED_TARGET_PARAMETER", id="embeddings"),
    pytest.param("experts.gate_up_proj", "UNSUPPORTED_ADAPTER_CONFIG", id="a-string"),
    pytest.param([*EXPERTS, 3], "UNSUPPORTED_ADAPTER_CONFIG", id="an-int"),
    pytest.param({"experts.down_proj": 1}, "UNSUPPORTED_ADAPTER_CONFIG", id="a-dict"),
])
def test_parse_config_refuses_other_target_parameters(parameters, reason):
    err = _expect_invalid(reason, peft_format.parse_config, _config(target_parameters=parameters))
    if reason == "UNSUPPORTED_TARGET_PARAMETER":
        assert "experts.gate_up_proj" in err.message and "experts.down_proj" in err.message


def test_parse_config_needs_target_modules_without_target_parameters():
    _expect_invalid("UNSUPPORTED_ADAPTER_CONFIG", peft_format.parse_config,
                    _config(target_modules=None, target_parameters=None))


# --- check_factors ---------------------------------------------------------------------


def _factors(rank=4, experts=3, **overrides) -> dict[str, TensorHeader]:
    shapes = {
        f"{LAYER}.gate_up_proj.lora_A.weight": (experts * rank, 16),
        f"{LAYER}.gate_up_proj.lora_B.weight": (40, rank * experts),
        f"{LAYER}.down_proj.lora_A.weight": (experts * rank, 20),
        f"{LAYER}.down_proj.lora_B.weight": (16, rank * experts),
        "model.layers.0.self_attn.q_proj.lora_A.weight": (rank, 16),
        "model.layers.0.self_attn.q_proj.lora_B.weight": (32, rank),
    } | overrides
    return {peft_format.peft_key(name): TensorHeader("F32", shape) for name, shape in shapes.items() if shape}


def test_check_factors_accepts_expert_factors_under_target_parameters():
    modules = peft_format.check_factors(_factors(), 4, tuple(EXPERTS))
    assert modules == {f"{LAYER}.gate_up_proj", f"{LAYER}.down_proj", "model.layers.0.self_attn.q_proj"}
    assert peft_format.lora_switches(modules) == {"train_attn": True, "train_mlp": False, "train_unembed": False,
                                                  "train_experts": True}


@pytest.mark.parametrize("tensors, rank", [
    pytest.param(_factors(**{f"{LAYER}.down_proj.lora_A.weight": (13, 20)}), 4, id="A-rows-not-a-rank-multiple"),
    pytest.param(_factors(**{f"{LAYER}.down_proj.lora_B.weight": (16, 8)}), 4, id="B-columns-differ-from-A-rows"),
    pytest.param(_factors(**{f"{LAYER}.down_proj.lora_A.weight": (8, 20), f"{LAYER}.down_proj.lora_B.weight": (16, 8)}),
                 4, id="expert-counts-differ"),
    pytest.param(_factors(**{f"{LAYER}.gate_up_proj.lora_B.weight": ()}), 4, id="only-lora-A"),
    pytest.param(_factors(**{f"{LAYER}.gate_up_proj.lora_A.weight": (3, 4, 16)}), 4, id="three-dim"),
    pytest.param(_factors(**{"model.layers.0.self_attn.q_proj.lora_A.weight": (12, 16),
                             "model.layers.0.self_attn.q_proj.lora_B.weight": (32, 12)}), 4, id="linear-with-expert-rank"),
    pytest.param(_factors(), 5, id="rank-mismatch"),
])
def test_check_factors_refuses_inconsistent_expert_factors(tensors, rank):
    _expect_invalid("BAD_ADAPTER_WEIGHTS", peft_format.check_factors, tensors, rank, tuple(EXPERTS))


def test_check_factors_refuses_expert_factors_the_config_does_not_declare():
    err = _expect_invalid("BAD_ADAPTER_WEIGHTS", peft_format.check_factors, _factors(), 4)
    assert "target_parameters" in err.message
