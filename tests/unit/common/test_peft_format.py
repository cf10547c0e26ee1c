"""peft_format.py: safetensors headers, adapter configs and LoRA factor checks."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save as save_numpy

from tunemesh_common.lora import peft_format
from tunemesh.errors import InvalidArgumentError
from tunemesh_common.lora.peft_format import TensorHeader


def _raw_safetensors(header: object, body: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + body


def _config_bytes(**overrides) -> bytes:
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    config.update(overrides)
    return json.dumps(config).encode()


def _expect_invalid(reason: str, call, *args):
    with pytest.raises(InvalidArgumentError) as err:
        call(*args)
    assert err.value.reason == reason
    return err.value


# --- read_header -----------------------------------------------------------------------


def test_read_header_of_a_numpy_file_gives_dtype_and_shape():
    data = save_numpy({"a": np.zeros((3, 5), np.float32), "b": np.ones((7,), np.float32)}, metadata={"format": "np"})
    assert peft_format.read_header(data) == {"a": TensorHeader("F32", (3, 5)), "b": TensorHeader("F32", (7,))}


def test_read_header_of_torch_half_precision_files():
    torch = pytest.importorskip("torch")
    from safetensors.torch import save as save_torch

    data = save_torch(
        {"h": torch.zeros(4, 2, dtype=torch.float16), "b": torch.zeros(2, 3, 5, dtype=torch.bfloat16)},
        metadata={"format": "pt"},
    )
    assert peft_format.read_header(data) == {"h": TensorHeader("F16", (4, 2)), "b": TensorHeader("BF16", (2, 3, 5))}


def test_read_header_accepts_scalars_and_empty_tensors():
    data = save_numpy({"s": np.array(1.0, np.float32), "e": np.zeros((0, 4), np.float32)})
    assert peft_format.read_header(data) == {"s": TensorHeader("F32", ()), "e": TensorHeader("F32", (0, 4))}


def test_read_header_of_an_empty_file_is_empty():
    assert peft_format.read_header(_raw_safetensors({})) == {}
    assert peft_format.read_header(_raw_safetensors({"__metadata__": {"format": "pt"}})) == {}


def _good_entry(**overrides) -> dict:
    return {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]} | overrides


CORRUPT_FILES = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x02\x00\x00\x00\x00\x00\x00", id="seven-bytes"),
    pytest.param(struct.pack("<Q", 100) + b"{}", id="header-longer-than-file"),
    pytest.param(struct.pack("<Q", 2**63) + b"{}", id="huge-header-length"),
    pytest.param(struct.pack("<Q", 5) + b"{not ", id="header-not-json"),
    pytest.param(struct.pack("<Q", 2) + b"\xff\xfe", id="header-not-utf8"),
    pytest.param(_raw_safetensors([1, 2]), id="header-a-list"),
    pytest.param(_raw_safetensors("x"), id="header-a-string"),
    pytest.param(_raw_safetensors({"t": _good_entry()}, b"\0" * 20), id="body-too-short"),
    pytest.param(_raw_safetensors({"t": _good_entry(shape=[2, 4])}, b"\0" * 24), id="shape-vs-offsets"),
    pytest.param(_raw_safetensors({"t": _good_entry(data_offsets=[4, 28])}, b"\0" * 24), id="past-the-end"),
    pytest.param(_raw_safetensors({"t": _good_entry(data_offsets=[24, 0])}, b"\0" * 24), id="reversed-offsets"),
    pytest.param(_raw_safetensors({"t": _good_entry(data_offsets=[-4, 20])}, b"\0" * 24), id="negative-offset"),
    pytest.param(_raw_safetensors({"t": _good_entry(data_offsets=[0.0, 24.0])}, b"\0" * 24), id="float-offsets"),
    pytest.param(_raw_safetensors({"t": _good_entry(data_offsets=[0, 24, 48])}, b"\0" * 48), id="three-offsets"),
    pytest.param(_raw_safetensors({"t": _good_entry(dtype="I64", shape=[3], data_offsets=[0, 24])}, b"\0" * 24),
                 id="dtype-I64"),
    pytest.param(_raw_safetensors({"t": _good_entry(dtype="F64", shape=[3], data_offsets=[0, 24])}, b"\0" * 24),
                 id="dtype-F64"),
    pytest.param(_raw_safetensors({"t": _good_entry(dtype="f32")}, b"\0" * 24), id="dtype-lowercase"),
    pytest.param(_raw_safetensors({"t": {"shape": [2, 3], "data_offsets": [0, 24]}}, b"\0" * 24), id="no-dtype"),
    pytest.param(_raw_safetensors({"t": {"dtype": "F32", "data_offsets": [0, 24]}}, b"\0" * 24), id="no-shape"),
    pytest.param(_raw_safetensors({"t": {"dtype": "F32", "shape": [2, 3]}}, b"\0" * 24), id="no-offsets"),
    pytest.param(_raw_safetensors({"t": _good_entry(shape=[2, None])}, b"\0" * 24), id="shape-null"),
    pytest.param(_raw_safetensors({"t": _good_entry(shape=6)}, b"\0" * 24), id="shape-an-int"),
    pytest.param(_raw_safetensors({"t": [1, 2]}, b"\0" * 24), id="entry-a-list"),
    pytest.param(_raw_safetensors({"t": "F32"}, b"\0" * 24), id="entry-a-string"),
]


@pytest.mark.parametrize("data", CORRUPT_FILES)
def test_read_header_refuses_corrupt_files(data):
    _expect_invalid("BAD_SAFETENSORS", peft_format.read_header, data)


def test_read_header_refuses_a_truncated_real_file():
    data = save_numpy({"a": np.zeros((3, 5), np.float32)})
    _expect_invalid("BAD_SAFETENSORS", peft_format.read_header, data[:-1])


# Known gaps, kept strict so they flag when fixed (see the report that added them).
def test_read_header_refuses_an_unhashable_dtype():
    data = _raw_safetensors({"t": _good_entry(dtype=["F32"])}, b"\0" * 24)
    _expect_invalid("BAD_SAFETENSORS", peft_format.read_header, data)


def test_read_header_refuses_negative_dimensions():
    data = _raw_safetensors({"t": _good_entry(shape=[-2, -3])}, b"\0" * 24)
    _expect_invalid("BAD_SAFETENSORS", peft_format.read_header, data)


# --- parse_config ----------------------------------------------------------------------


def _peft_config_bytes(**kwargs) -> bytes:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(**kwargs).to_dict()
    return json.dumps({k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}).encode()


def test_parse_config_accepts_a_real_peft_lora_config():
    raw = _peft_config_bytes(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    config = peft_format.parse_config(raw)
    assert config.rank == 8
    assert config.alpha == 16.0 and isinstance(config.alpha, float)
    assert sorted(config.target_modules) == ["q_proj", "v_proj"]


def test_parse_config_defaults_alpha_to_rank():
    raw = json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}).encode()
    assert peft_format.parse_config(raw).alpha == 4.0


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"use_dora": True}, id="dora"),
        pytest.param({"use_rslora": True}, id="rslora"),
        pytest.param({"bias": "all"}, id="bias-all"),
        pytest.param({"bias": "lora_only"}, id="bias-lora-only"),
        pytest.param({"modules_to_save": ["lm_head"]}, id="modules-to-save"),
        pytest.param({"rank_pattern": {"q_proj": 4}}, id="rank-pattern"),
        pytest.param({"alpha_pattern": {"q_proj": 4}}, id="alpha-pattern"),
        pytest.param({"target_modules": ".*q_proj"}, id="regex-targets"),
        pytest.param({"target_modules": "all-linear"}, id="all-linear"),
    ],
)
def test_parse_config_refuses_real_peft_configs_it_cannot_serve(kwargs):
    raw = _peft_config_bytes(**{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **kwargs})
    _expect_invalid("UNSUPPORTED_ADAPTER_CONFIG", peft_format.parse_config, raw)


@pytest.mark.parametrize(
    "raw, reason",
    [
        pytest.param(b"{not json", "BAD_ADAPTER_CONFIG", id="not-json"),
        pytest.param(b"\xff\xfe\x00", "BAD_ADAPTER_CONFIG", id="not-utf8"),
        pytest.param(b"", "BAD_ADAPTER_CONFIG", id="empty"),
        pytest.param(b"[]", "BAD_ADAPTER_CONFIG", id="a-list"),
        pytest.param(b"null", "BAD_ADAPTER_CONFIG", id="null"),
        pytest.param(_config_bytes(peft_type="IA3"), "BAD_ADAPTER_CONFIG", id="ia3"),
        pytest.param(_config_bytes(peft_type=None), "BAD_ADAPTER_CONFIG", id="no-peft-type"),
        pytest.param(_config_bytes(r=0), "BAD_ADAPTER_CONFIG", id="r-zero"),
        pytest.param(_config_bytes(r=-4), "BAD_ADAPTER_CONFIG", id="r-negative"),
        pytest.param(_config_bytes(r="8"), "BAD_ADAPTER_CONFIG", id="r-string"),
        pytest.param(_config_bytes(r=8.0), "BAD_ADAPTER_CONFIG", id="r-float"),
        pytest.param(_config_bytes(r=True), "BAD_ADAPTER_CONFIG", id="r-bool"),
        pytest.param(_config_bytes(r=None), "BAD_ADAPTER_CONFIG", id="r-null"),
        pytest.param(_config_bytes(lora_alpha=-1), "BAD_ADAPTER_CONFIG", id="alpha-negative"),
        pytest.param(_config_bytes(lora_alpha="16"), "BAD_ADAPTER_CONFIG", id="alpha-string"),
        pytest.param(_config_bytes(lora_alpha=True), "BAD_ADAPTER_CONFIG", id="alpha-bool"),
        pytest.param(_config_bytes(lora_alpha=None), "BAD_ADAPTER_CONFIG", id="alpha-null"),
        pytest.param(_config_bytes(lora_alpha=float("nan")), "BAD_ADAPTER_CONFIG", id="alpha-nan"),
        pytest.param(_config_bytes(use_dora=True), "UNSUPPORTED_ADAPTER_CONFIG", id="dora"),
        pytest.param(_config_bytes(use_rslora=True), "UNSUPPORTED_ADAPTER_CONFIG", id="rslora"),
        pytest.param(_config_bytes(bias="all"), "UNSUPPORTED_ADAPTER_CONFIG", id="bias-all"),
        pytest.param(_config_bytes(fan_in_fan_out=True), "UNSUPPORTED_ADAPTER_CONFIG", id="fan-in-fan-out"),
        pytest.param(_config_bytes(modules_to_save=["lm_head"]), "UNSUPPORTED_ADAPTER_CONFIG", id="modules-to-save"),
        pytest.param(_config_bytes(rank_pattern={"q_proj": 4}), "UNSUPPORTED_ADAPTER_CONFIG", id="rank-pattern"),
        pytest.param(_config_bytes(alpha_pattern={"q_proj": 4}), "UNSUPPORTED_ADAPTER_CONFIG", id="alpha-pattern"),
        pytest.param(_config_bytes(target_modules="q_proj|v_proj"), "UNSUPPORTED_ADAPTER_CONFIG", id="regex"),
        pytest.param(_config_bytes(target_modules=None), "UNSUPPORTED_ADAPTER_CONFIG", id="targets-null"),
        pytest.param(_config_bytes(target_modules=["q_proj", 3]), "UNSUPPORTED_ADAPTER_CONFIG", id="targets-int"),
        pytest.param(_config_bytes(target_modules={"q_proj": 1}), "UNSUPPORTED_ADAPTER_CONFIG", id="targets-dict"),
    ],
)
def test_parse_config_refuses_bad_and_unsupported_configs(raw, reason):
    _expect_invalid(reason, peft_format.parse_config, raw)


def test_parse_config_refuses_an_infinite_alpha():
    _expect_invalid("BAD_ADAPTER_CONFIG", peft_format.parse_config, _config_bytes(lora_alpha=float("inf")))


# --- build_config ----------------------------------------------------------------------

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "lm_head"]


def test_build_config_parses_back_with_sorted_unique_target_suffixes():
    built = peft_format.build_config("org/base-model", 16, 32.0, MODULES)
    assert built["target_modules"] == ["lm_head", "q_proj"]
    assert built["base_model_name_or_path"] == "org/base-model"
    parsed = peft_format.parse_config(json.dumps(built).encode())
    assert (parsed.rank, parsed.alpha, parsed.target_modules) == (16, 32.0, ("lm_head", "q_proj"))


def test_build_config_loads_as_a_peft_lora_config():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig.from_peft_type(**peft_format.build_config("org/base-model", 4, 8.0, MODULES))
    assert isinstance(config, peft.LoraConfig)
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (4, 8.0, {"lm_head", "q_proj"})


# --- tensor names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["model.layers.0.self_attn.q_proj.lora_A.weight", "lm_head.lora_B.weight", "x.lora_A.weight"]
)
def test_peft_key_and_internal_name_round_trip(name):
    key = peft_format.peft_key(name)
    assert key == "base_model.model." + name
    assert peft_format.internal_name(key) == name


def test_module_of_strips_the_factor_suffix():
    assert peft_format.module_of("model.layers.0.mlp.up_proj.lora_B.weight") == "model.layers.0.mlp.up_proj"


@pytest.mark.parametrize(
    "key",
    [
        "model.layers.0.self_attn.q_proj.lora_A.weight",  # no prefix
        "base_model.model.model.layers.0.self_attn.q_proj.weight",  # a base weight
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",  # in-memory name
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.bias",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        "base_model.model.lm_head.weight",
        "base_model.q_proj.lora_A.weight",
        "",
    ],
)
def test_internal_name_refuses_keys_that_are_not_lora_factors(key):
    _expect_invalid("BAD_ADAPTER_WEIGHTS", peft_format.internal_name, key)


# --- lora_switches ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "modules, switches",
    [
        ({"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"}, (True, False, False)),
        ({"model.layers.3.mlp.gate_proj", "model.layers.3.mlp.down_proj"}, (False, True, False)),
        ({"lm_head"}, (False, False, True)),
        ({"model.layers.0.self_attn.k_proj", "model.layers.0.mlp.up_proj", "lm_head"}, (True, True, True)),
        (set(), (False, False, False)),
    ],
)
def test_lora_switches_name_the_groups_in_use(modules, switches):
    got = peft_format.lora_switches(modules)
    assert (got["train_attn"], got["train_mlp"], got["train_unembed"]) == switches


@pytest.mark.parametrize(
    "module", ["model.embed_tokens", "embed_tokens", "model.layers.0.self_attn.qkv_proj", "q_proj.x"]
)
def test_lora_switches_refuse_other_modules(module):
    _expect_invalid("UNSUPPORTED_TARGET_MODULE", peft_format.lora_switches, {"model.layers.0.self_attn.q_proj", module})


# --- check_factors ---------------------------------------------------------------------


def _factors(rank: int = 4, **overrides: tuple[int, ...]) -> dict[str, TensorHeader]:
    shapes = {
        "model.layers.0.self_attn.q_proj.lora_A.weight": (rank, 32),
        "model.layers.0.self_attn.q_proj.lora_B.weight": (48, rank),
        "lm_head.lora_A.weight": (rank, 32),
        "lm_head.lora_B.weight": (100, rank),
    } | overrides
    return {peft_format.peft_key(name): TensorHeader("F32", shape) for name, shape in shapes.items() if shape}


def test_check_factors_returns_the_modules_of_a_consistent_set():
    assert peft_format.check_factors(_factors(), 4) == {"model.layers.0.self_attn.q_proj", "lm_head"}


def test_check_factors_of_a_file_written_with_peft_keys():
    arrays = {
        "lm_head.lora_A.weight": np.zeros((2, 8), np.float32),
        "lm_head.lora_B.weight": np.zeros((5, 2), np.float32),
    }
    data = save_numpy({peft_format.peft_key(k): v for k, v in arrays.items()})
    assert peft_format.check_factors(peft_format.read_header(data), 2) == {"lm_head"}


@pytest.mark.parametrize(
    "tensors, rank",
    [
        pytest.param({}, 4, id="empty"),
        pytest.param(_factors(**{"lm_head.lora_B.weight": ()}), 4, id="only-lora-A"),
        pytest.param(_factors(**{"lm_head.lora_A.weight": ()}), 4, id="only-lora-B"),
        pytest.param(_factors(), 8, id="rank-mismatch"),
        pytest.param(_factors(**{"lm_head.lora_A.weight": (8, 32)}), 4, id="A-rank-mismatch"),
        pytest.param(_factors(**{"lm_head.lora_B.weight": (100, 8)}), 4, id="B-rank-mismatch"),
        pytest.param(_factors(**{"lm_head.lora_B.weight": (4, 100)}), 4, id="B-transposed"),
        pytest.param(_factors(**{"lm_head.lora_A.weight": (128,)}), 4, id="one-dim"),
        pytest.param(_factors(**{"lm_head.lora_A.weight": (4, 32, 1)}), 4, id="three-dim"),
        pytest.param(
            {**_factors(), "base_model.model.lm_head.weight": TensorHeader("F32", (100, 32))}, 4, id="base-weight"
        ),
        pytest.param({"lm_head.lora_A.weight": TensorHeader("F32", (4, 32))}, 4, id="no-prefix"),
    ],
)
def test_check_factors_refuses_inconsistent_sets(tensors, rank):
    _expect_invalid("BAD_ADAPTER_WEIGHTS", peft_format.check_factors, tensors, rank)


# --- the format against PEFT itself ----------------------------------------------------


def _tiny_model():
    torch = pytest.importorskip("torch")

    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(6, 4, bias=False)
            self.v_proj = torch.nn.Linear(6, 4, bias=False)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([Attention(), Attention()])
            self.lm_head = torch.nn.Linear(4, 10, bias=False)

        def prepare_inputs_for_generation(self, *args, **kwargs):  # PEFT's CAUSAL_LM wrapper looks it up
            raise NotImplementedError

    torch.manual_seed(0)
    return Model()


def test_an_adapter_saved_by_peft_passes_every_check(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_tiny_model(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path)
    config = peft_format.parse_config((tmp_path / peft_format.CONFIG_FILE).read_bytes())
    tensors = peft_format.read_header((tmp_path / peft_format.WEIGHTS_FILE).read_bytes())
    modules = peft_format.check_factors(tensors, config.rank)
    assert modules == {f"layers.{i}.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}
    assert peft_format.lora_switches(modules) == {"train_attn": True, "train_mlp": False, "train_unembed": False,
                                                  "train_experts": False}


def test_a_built_adapter_loads_in_peft_with_its_weights(tmp_path):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    modules = ["layers.0.q_proj", "layers.1.q_proj", "lm_head"]
    in_out = {"layers.0.q_proj": (6, 4), "layers.1.q_proj": (6, 4), "lm_head": (4, 10)}
    factors = {}
    for module in modules:
        fan_in, fan_out = in_out[module]
        factors[f"{module}.lora_A.weight"] = torch.randn(3, fan_in)
        factors[f"{module}.lora_B.weight"] = torch.randn(fan_out, 3)
    (tmp_path / peft_format.CONFIG_FILE).write_text(json.dumps(peft_format.build_config("tiny", 3, 6.0, modules)))
    save_file({peft_format.peft_key(k): v for k, v in factors.items()}, tmp_path / peft_format.WEIGHTS_FILE)

    loaded = peft.PeftModel.from_pretrained(_tiny_model(), tmp_path)
    for module in modules:
        layer = loaded.base_model.model.get_submodule(module)
        assert layer.scaling["default"] == pytest.approx(2.0)
        torch.testing.assert_close(layer.lora_A["default"].weight, factors[f"{module}.lora_A.weight"])
        torch.testing.assert_close(layer.lora_B["default"].weight, factors[f"{module}.lora_B.weight"])
    assert not hasattr(loaded.base_model.model.layers[0].v_proj, "lora_A")
