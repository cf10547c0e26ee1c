"""A fused pass small enough runs on one thread (no second thread to wake for each small
operation: with OMP_WAIT_POLICY=PASSIVE that cost 4-5x on tiny models), a large one on
torch's threads, or, with several adapters, in lanes of one thread each; in batch-invariant
mode an item's loss, logprobs and LoRA gradients are bit-identical every way: alone (one
thread), in a crowded batch (two threads) and in a lane."""

from __future__ import annotations

import pathlib
import threading
import time

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
    engine.one_thread_work, engine.lanes = 0, False
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


def _outcomes(engine, items: list[EngineItem]) -> tuple[list, dict]:
    """Every item's outcome, and every adapter's fresh gradients, from one fused pass."""
    for adapter in engine.adapter_ids():
        engine.adapter(adapter).drop_fresh_grads()
        for acc in engine.adapter(adapter).grads:
            acc.zero_()
    outcomes = engine.run_batch(items)
    grads = {(adapter, name): grad.clone() for adapter in engine.adapter_ids()
             for name, grad in engine.adapter(adapter).accumulated_grads().items()}
    return outcomes, grads


def _assert_same(mine: tuple[list, dict], theirs: tuple[list, dict]) -> None:
    for a, b in zip(mine[0], theirs[0], strict=True):
        assert a.failure is None and b.failure is None, (a.failure, b.failure)
        assert a.metrics["loss:sum"] == b.metrics["loss:sum"], a.item_id
        for da, db in zip(a.outputs, b.outputs, strict=True):
            for name in da:
                assert np.array_equal(da[name], db[name]), (a.item_id, name)
    assert mine[1].keys() == theirs[1].keys()
    for key in mine[1]:
        assert torch.equal(mine[1][key], theirs[1][key]), key


def _lane_batch() -> list[EngineItem]:
    """Four adapters (one of them twice, one forward only) whose tokens split evenly in two lanes."""
    return [_item("a0", 2, 40, 1), _item("a1", 1, 64, 2), _item("a2", 3, 30, 3, ItemKind.FORWARD),
            _item("a0", 1, 24, 4), _item("a3", 2, 50, 5)]


def test_a_large_batch_of_several_adapters_runs_in_lanes_of_one_thread(wide_dense_dir, two_threads):
    engine = _engine(wide_dense_dir)
    engine.one_thread_work = 0
    seen: list[tuple[int, int]] = []
    engine.model.register_forward_pre_hook(
        lambda module, args: seen.append((threading.get_ident(), torch.get_num_threads())))
    engine.run_batch(_lane_batch())
    assert len({ident for ident, _ in seen}) == 2 and {threads for _, threads in seen} == {1}
    seen.clear()
    engine.run_batch([_item("a0", 4, 64, 6)])  # one adapter: one pass on torch's threads
    assert seen == [(threading.get_ident(), 2)]
    assert torch.get_num_threads() == 2


def test_lanes_give_every_item_the_bits_of_one_pass_and_of_running_alone(wide_dense_dir, two_threads):
    engine = _engine(wide_dense_dir)
    engine.one_thread_work = 0
    laned = _outcomes(engine, _lane_batch())
    engine.lanes = False
    one_pass = _outcomes(engine, _lane_batch())
    _assert_same(laned, one_pass)
    engine.lanes = True
    for adapter in ("a1", "a3"):  # alone, each adapter's numbers again
        items = [item for item in _lane_batch() if item.adapter_id == adapter]
        outcomes, grads = _outcomes(engine, items)
        own = {key: grad for key, grad in laned[1].items() if key[0] == adapter}
        _assert_same((outcomes, {key: grads[key] for key in own}),
                     ([o for o in laned[0] if o.item_id.startswith(adapter)], own))


def test_a_failed_lane_waits_for_the_others_before_its_items_run_alone(wide_dense_dir, two_threads, monkeypatch):
    """The first lane (run by the caller) fails while the second is still running: the items
    are retried alone only once the second lane has stopped, and end as a clean batch's."""
    from tunemesh_trainer.engine.torch_engine import TorchTrainingEngine

    clean = _engine(wide_dense_dir)
    clean.one_thread_work = 0
    expected = _outcomes(clean, _lane_batch())
    engine = _engine(wide_dense_dir)
    engine.one_thread_work = 0
    real, failed, lock = TorchTrainingEngine._run_chunk, threading.Event(), threading.Lock()
    running, overlaps, calls = [0], [], []

    def run_chunk(self, parts, outcomes, usage, walk_all):
        adapters = {part.item.adapter_id for part in parts}
        with lock:
            calls.append(adapters)
            first = len(calls) <= 2  # the two lanes' first chunks
            if failed.is_set() and not first:
                overlaps.append(running[0])  # a retry: nothing else may still run
            running[0] += 1
        try:
            if first and "a0" in adapters:
                failed.set()
                raise RuntimeError("simulated failure in the caller's lane")
            if first:
                assert failed.wait(30)
                time.sleep(0.2)  # still running well after the other lane failed
            return real(self, parts, outcomes, usage, walk_all)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(TorchTrainingEngine, "_run_chunk", run_chunk)
    result = _outcomes(engine, _lane_batch())
    assert overlaps and set(overlaps) == {0}
    _assert_same(result, expected)


def test_lanes_share_the_callers_threads_between_them(wide_dense_dir, two_threads):
    """On a host with more threads than adapters in the batch, each lane gets an equal
    share of them (no core left idle by a lane of one thread)."""
    engine = _engine(wide_dense_dir)
    engine.one_thread_work = 0
    seen: list[tuple[int, int]] = []
    engine.model.register_forward_pre_hook(
        lambda module, args: seen.append((threading.get_ident(), torch.get_num_threads())))
    torch.set_num_threads(4)
    engine.run_batch([_item("a0", 2, 40, 1), _item("a1", 2, 40, 2)])
    assert len({ident for ident, _ in seen}) == 2 and {threads for _, threads in seen} == {2}
    seen.clear()
    engine.run_batch([_item(f"a{i}", 2, 40, i) for i in range(4)])  # four lanes now: the pool grows
    assert len({ident for ident, _ in seen}) == 4 and {threads for _, threads in seen} == {1}
