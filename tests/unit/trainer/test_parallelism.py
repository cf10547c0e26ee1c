"""The torch engine's parallelism strategies, chosen per rank (pure, no process group)."""

from __future__ import annotations

import numpy as np
import torch

from tunemesh_trainer.domain import DatumArrays, EngineItem, ItemKind, ItemOutcome
from tunemesh_trainer.engine.data_parallel import DataParallel, SingleProcess, parallelism, share_items
from tunemesh_trainer.engine.expert_usage import ExpertUsage


def _item(item_id: str, lengths: list[int]) -> EngineItem:
    data = [DatumArrays(np.zeros(n, dtype=np.int64), {"target_tokens": np.zeros(n, dtype=np.int64)}) for n in lengths]
    return EngineItem(item_id, "a", ItemKind.FORWARD_BACKWARD, data)


def test_one_rank_is_a_single_process_and_more_are_data_parallel():
    one = parallelism(0, 1, "cpu")
    assert isinstance(one, SingleProcess)
    assert not one.concurrent_passes  # DeepSpeed's hooks gather weights for one pass at a time
    dp = parallelism(1, 3, "cpu")
    assert isinstance(dp, DataParallel) and (dp.rank, dp.world) == (1, 3)
    assert not dp.retries_alone and dp.walks_all_layers and not dp.concurrent_passes


def test_a_single_process_runs_every_row_and_changes_nothing():
    single = SingleProcess()
    items = [_item("x", [6, 9]), _item("y", [5])]
    assert single.local_items(items) == items and single.pass_count(4) == 4
    outcome = ItemOutcome(item_id="x", outputs=[{"logprobs": np.ones(2)}], metrics={"loss:sum": 1.5})
    single.merge_outcomes([outcome], ExpertUsage())
    assert outcome.metrics == {"loss:sum": 1.5} and len(outcome.outputs) == 1
    assert single.retries_alone and not single.walks_all_layers and single.concurrent_passes


def test_data_parallel_runs_its_share_and_walks_every_layer():
    items = [_item("x", [6, 9]), _item("y", [5]), _item("z", [4, 7, 3])]
    dp = DataParallel(rank=1, world=2)
    assert [len(i.data) for i in dp.local_items(items)] == [len(i.data) for i in share_items(items, 1, 2)]
    from transformers import AutoModelForCausalLM, Qwen3Config

    model = AutoModelForCausalLM.from_config(Qwen3Config(vocab_size=16, hidden_size=8, num_hidden_layers=1,
                                                         num_attention_heads=1, num_key_value_heads=1,
                                                         head_dim=8, intermediate_size=8)).requires_grad_(False)
    embed = model.get_input_embeddings()
    assert not embed(torch.tensor([1])).requires_grad
    dp.prepare(model)  # a backward then reaches every layer, also with no LoRA row on this rank
    assert embed(torch.tensor([1])).requires_grad
