"""A fused pass small enough runs on one thread (no second thread to wake for each small
operation: with OMP_WAIT_POLICY=PASSIVE that cost 4-5x on tiny models), a large one on
torch's threads, and in batch-invariant mode an item's loss, logprobs and LoRA gradients
are bit-identical either way: alone (one thread) and in a crowded batch (two threads)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

from tunemesh_common.numerics import batch_invariant
from tunemesh_trainer.domain import AdapterState, DatumArrays, EngineItem, ItemKind, LoraSpec
from tunemesh_trainer.engine import build_torch_engine

VOCAB = 1024
pytestmark = pytest.mark.skipif(batch_invariant._THREAD_LOCAL is None,
                                reason="this torch build has no per-thread thread counts (one_thread is a no-op)")


@pytest.fixture(scope="module")
def wide_dense_dir(tmp_path_factory) -> pathlib.Path:
    """Wider than the shared tiny model, so two threads really split its GEMMs."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(99)
    path = tmp_path_factory.mktemp("wide_dense")
    AutoModelForCausalLM.from_config(Qwen3Config(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, intermediate_size=512)).save_pretrained(path)
    return path


def _engine(model_dir: pathlib.Path):
    engine = build_torch_engine(model_dir, "wide", "dense", max_lora_rank=16, max_seq_len=256)
    rng = np.random.default_rng(0)
    for i in range(4):
        engine.create_adapter(f"a{i}", LoraSpec(rank=8, alpha=16.0, seed=i))
        state = engine.export_adapter(f"a{i}", False)  # nonzero B: gradients reach every factor
        engine.import_adapter(f"a{i}", AdapterState(state.spec, {
            name: rng.normal(0.0, 0.05, w.shape).astype(np.float32) for name, w in state.weights.items()}))
    return engine


def _item(adapter: str, rows: int, tokens: int, seed: int, kind=ItemKind.FORWARD_BACKWARD) -> EngineItem:
    rng = np.random.default_rng(seed)
    return EngineItem(f"{adapter}-{seed}", adapter, kind, [
        DatumArrays(rng.integers(1, VOCAB, tokens), {"target_tokens": rng.integers(1, VOCAB, tokens),
                                                     "weights": np.ones(tokens, np.float32)})
        for _ in range(rows)])


def _threads_seen(engine) -> list[int]:
    seen: list[int] = []
    engine.model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    return seen


def _pass(engine, items: list[EngineItem]):
    """The first item's outcome and its adapter's gradients from one fused pass."""
    for adapter in engine.adapter_ids():
        engine.adapter(adapter).drop_fresh_grads()
        for acc in engine.adapter(adapter).grads:
            acc.zero_()
    outcome = engine.run_batch(items)[0]
    assert outcome.failure is None, outcome.failure
    grads = {k: v.clone() for k, v in engine.adapter(items[0].adapter_id).accumulated_grads().items()}
    return outcome, grads


def test_small_batches_run_on_one_thread_and_large_ones_on_torch_s(wide_dense_dir, two_threads):
    engine = _engine(wide_dense_dir)
    seen = _threads_seen(engine)
    engine.run_batch([_item("a0", 1, 8, 1)])
    assert seen[-1] == 1
    engine.one_thread_work = 0  # every batch is "large"
    engine.run_batch([_item("a0", 1, 8, 1)])
    assert seen[-1] == 2
    assert torch.get_num_threads() == 2  # the caller's threads are restored


@pytest.mark.parametrize("rows, tokens", [(1, 5), (2, 33), (3, 100)])
@pytest.mark.parametrize("kind", [ItemKind.FORWARD_BACKWARD, ItemKind.FORWARD])
def test_an_item_is_bit_identical_alone_on_one_thread_and_crowded_on_two(wide_dense_dir, two_threads, rows, tokens,
                                                                          kind):
    engine = _engine(wide_dense_dir)
    seen = _threads_seen(engine)
    item = _item("a0", rows, tokens, 7, kind)
    crowd = [_item(f"a{i}", 4, 64, 100 + i) for i in (1, 2, 3)]
    alone, alone_grads = _pass(engine, [item])
    assert seen[-1] == 1
    engine.one_thread_work = 0
    crowded, crowded_grads = _pass(engine, [item, *crowd])
    assert seen[-1] == 2
    assert alone.metrics["loss:sum"] == crowded.metrics["loss:sum"]
    for mine, theirs in zip(alone.outputs, crowded.outputs, strict=True):
        for name in mine:
            assert np.array_equal(mine[name], theirs[name]), name
    assert alone_grads.keys() == crowded_grads.keys()
    for name in alone_grads:
        assert torch.equal(alone_grads[name], crowded_grads[name]), name


def test_optimizer_steps_run_on_one_thread(wide_dense_dir, two_threads, monkeypatch):
    from tunemesh_trainer.domain import AdamSpec
    from tunemesh_trainer.engine import adapter as adapter_mod

    engine = _engine(wide_dense_dir)
    seen: list[int] = []
    real = adapter_mod.AdapterSlot.optim_step

    def spy(self, adam):
        seen.append(torch.get_num_threads())
        return real(self, adam)

    monkeypatch.setattr(adapter_mod.AdapterSlot, "optim_step", spy)
    engine.optim_step("a0", AdamSpec(learning_rate=1e-3))
    assert seen == [1] and torch.get_num_threads() == 2
