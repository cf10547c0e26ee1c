"""Expert sharding in one process (the exchange across ranks is tested against the torch
engine in test_deepspeed_vs_torch.py): which weights a rank keeps, and bad sizes."""

from __future__ import annotations

import pytest
import torch

from tunemesh.errors import InvalidArgumentError
from tunemesh_common.lora.multi_lora import EXPERT_PARAMETERS
from tunemesh_trainer.domain import LoraSpec
from tunemesh_trainer.engine import build_torch_engine
from tunemesh_trainer.engine.expert_parallel import ExpertGroup, form_groups, shard_experts


def _engine(model_dir):
    return build_torch_engine(model_dir, name="tiny", family="moe", max_lora_rank=8, max_seq_len=32, num_threads=1)


def test_rank_keeps_only_its_experts_outside_the_parameters(tiny_moe_dir):
    engine = _engine(tiny_moe_dir)
    layers = engine.expert_layers
    assert layers  # tiny-moe has one MoE layer of 4 experts
    full = {name: {p: getattr(layer.base, p).detach().clone() for p in EXPERT_PARAMETERS}
            for name, layer in layers.items()}
    assert shard_experts(layers, ExpertGroup(group=None, size=2, rank=1)) == 2
    names = {name for name, _ in engine.model.named_parameters()}
    for name, layer in layers.items():
        assert layer.local_experts == range(2, 4)
        assert layer.exchange is not None
        for param in EXPERT_PARAMETERS:
            assert f"{name}.base.{param}" not in names  # ZeRO partitions parameters only
            torch.testing.assert_close(getattr(layer.base, param), full[name][param][2:4], rtol=0, atol=0)


def test_expert_lora_still_spans_every_expert_after_sharding(tiny_moe_dir):
    engine = _engine(tiny_moe_dir)
    shard_experts(engine.expert_layers, ExpertGroup(group=None, size=2, rank=0))
    engine.create_adapter("a", LoraSpec(rank=4, alpha=8, seed=1, train_experts=True))
    state = engine.export_adapter("a", with_optimizer=False)
    expert_a = [w for name, w in state.weights.items() if "gate_up_proj" in name and "lora_A" in name]
    assert expert_a and all(w.shape[0] == 4 * 4 for w in expert_a)  # experts x rank rows


@pytest.mark.parametrize(("world", "size"), [(2, 3), (4, 3), (2, 0)])
def test_sizes_that_do_not_divide_the_world_are_refused(world, size):
    with pytest.raises(InvalidArgumentError) as err:
        form_groups(world, 0, size)
    assert err.value.reason == "BAD_EXPERT_PARALLEL"


def test_experts_that_do_not_divide_are_refused(tiny_moe_dir):
    engine = _engine(tiny_moe_dir)
    with pytest.raises(InvalidArgumentError, match="not divisible by 3"):
        shard_experts(engine.expert_layers, ExpertGroup(group=None, size=3, rank=0))
