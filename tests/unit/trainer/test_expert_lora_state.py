"""Expert LoRA through checkpoints (PEFT files that PEFT itself loads) and the per-item
expert-utilisation metrics, checked against the base model's own router choices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft_reference import randomize_b, rel

from tunemesh_common.lora import peft_format
from tunemesh_trainer import checkpoint_files
from tunemesh_trainer.domain import AdamSpec, DatumArrays, EngineItem, ItemKind, LoraSpec
from tunemesh_trainer.engine import build_torch_engine

SPEC = LoraSpec(rank=4, alpha=8, train_mlp=False, train_unembed=False, train_experts=True, seed=7)


def _datum(rng: np.random.Generator, n: int) -> DatumArrays:
    return DatumArrays(tokens=rng.integers(0, 256, n),
                       loss_inputs={"target_tokens": rng.integers(0, 256, n), "weights": np.ones(n, np.float32)})


def _write(files: dict[str, list], directory) -> None:
    for name, parts in files.items():
        (directory / name).write_bytes(b"".join(bytes(p) for p in parts))


def test_expert_lora_checkpoint_loads_in_peft_and_round_trips(tiny_moe_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine = build_torch_engine(tiny_moe_dir, "moe", "moe", max_lora_rank=8, max_seq_len=32)
    engine.create_adapter("a", SPEC)
    randomize_b(engine, "a", torch.Generator().manual_seed(1))
    rng = np.random.default_rng(1)
    engine.run_batch([EngineItem("fb", "a", ItemKind.FORWARD_BACKWARD, [_datum(rng, 9)])])
    engine.optim_step("a", AdamSpec(learning_rate=1e-2))
    state = engine.export_adapter("a", with_optimizer=True)
    files = checkpoint_files.encode(state, "tiny-moe")
    _write(files, tmp_path)
    config = peft_format.read_header(b"".join(bytes(p) for p in files[peft_format.WEIGHTS_FILE]))
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in config

    datum = _datum(rng, 11)
    (got,) = engine.run_batch([EngineItem("f", "a", ItemKind.FORWARD, [datum])])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32), tmp_path)
    logits = peft.eval()(input_ids=torch.as_tensor(datum.tokens)[None]).logits[0]
    want = torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(datum.loss_inputs["target_tokens"])[:, None])[:, 0]
    assert rel(got.outputs[0]["logprobs"], want.detach()) <= 1e-4

    raw = {name: b"".join(bytes(p) for p in parts) for name, parts in files.items()}
    engine.create_adapter("b", SPEC)
    assert engine.import_adapter("b", checkpoint_files.decode(raw, SPEC, with_optimizer=True)) == 1
    for name, tensor in engine.adapter("a").weights().items():
        assert torch.equal(engine.adapter("b").weights()[name], tensor), name
    a_state, b_state = engine.export_adapter("a", True), engine.export_adapter("b", True)
    assert sorted(a_state.optimizer) == sorted(b_state.optimizer)
    bad = [k for k in a_state.optimizer  # steps come back as shape (1,) arrays
           if not np.array_equal(a_state.optimizer[k].ravel(), b_state.optimizer[k].ravel())]
    assert not bad


def test_exported_config_targets_expert_parameters():
    config = peft_format.build_config("m", 4, 8.0, ["model.layers.0.mlp.experts.down_proj",
                                                   "model.layers.0.mlp.experts.gate_up_proj",
                                                   "model.layers.0.self_attn.q_proj"])
    assert config["target_modules"] == ["q_proj"]
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert "target_parameters" not in peft_format.build_config("m", 4, 8.0, ["model.layers.0.self_attn.q_proj"])
    for name in ("model.layers.3.mlp.experts.gate_up_proj.lora_B.weight",
                 "model.layers.3.mlp.experts.down_proj.lora_A.weight", "model.layers.3.self_attn.q_proj.lora_A.weight"):
        assert peft_format.internal_name(peft_format.peft_key(name)) == name


def _router_counts(model_dir, data: list[DatumArrays]) -> torch.Tensor:
    """(layers, experts) choices of the base model's routers, each datum alone, unpadded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    routers = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    counts = torch.zeros(len(routers), model.config.num_experts, dtype=torch.long)
    def count(layer: int, out) -> None:
        counts[layer] += torch.bincount(out[2].reshape(-1), minlength=counts.shape[1])

    for layer, router in enumerate(routers):
        router.register_forward_hook(lambda _m, _i, out, layer=layer: count(layer, out))
    with torch.no_grad():
        for datum in data:
            model(input_ids=torch.as_tensor(datum.tokens)[None])
    return counts


def test_expert_usage_metrics_count_each_items_real_tokens(tiny_moe_dir):
    # Small chunks: an item spans chunks, and rows are padded to different lengths.
    engine = build_torch_engine(tiny_moe_dir, "moe", "moe", max_lora_rank=8, max_seq_len=32, max_batch_tokens=40)
    engine.create_adapter("ex", SPEC)
    engine.create_adapter("plain", LoraSpec(rank=2, train_mlp=False))
    rng = np.random.default_rng(3)
    items = [EngineItem("i0", "ex", ItemKind.FORWARD_BACKWARD, [_datum(rng, n) for n in (5, 17, 9)]),
             EngineItem("i1", "plain", ItemKind.FORWARD, [_datum(rng, n) for n in (3, 12)])]

    outcomes = engine.run_batch(items)

    for item, outcome in zip(items, outcomes):
        counts = _router_counts(tiny_moe_dir, item.data).double()  # "ex" has B = 0: base routing
        assert outcome.metrics["e_tokens_per_expert:mean"] == pytest.approx(float(counts.mean()))
        assert outcome.metrics["e_tokens_per_expert:max"] == float(counts.max())
        assert outcome.metrics["e_tokens_per_expert:min"] == float(counts.min())
        assert outcome.metrics["e_frac_with_tokens:mean"] == pytest.approx(float((counts > 0).double().mean()))
        assert all(key.count(":") == 1 for key in outcome.metrics)


def test_dense_model_reports_no_expert_metrics(tiny_dense_dir):
    engine = build_torch_engine(tiny_dense_dir, "dense", "dense", max_lora_rank=8, max_seq_len=32)
    engine.create_adapter("a", LoraSpec(rank=2, train_experts=True))  # no experts: ignored
    (outcome,) = engine.run_batch([EngineItem("i", "a", ItemKind.FORWARD, [_datum(np.random.default_rng(0), 6)])])
    assert set(outcome.metrics) == {"loss:sum", "num_tokens:sum"}
