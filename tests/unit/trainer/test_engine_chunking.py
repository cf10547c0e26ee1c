"""Fused passes split into chunks by padded size; unexpected errors fail only their item."""

from __future__ import annotations

import numpy as np
import pytest

from tunemesh_common.training import loss_specs
from tunemesh.errors import Code
from tunemesh_trainer.domain import AdamSpec, DatumArrays, EngineItem, ItemKind, LoraSpec
from tunemesh_trainer.engine import build_torch_engine, losses
from tunemesh_trainer.engine.batch import plan_chunks, plan_lanes

VOCAB = 256
FB = ItemKind.FORWARD_BACKWARD


def datum(seed: int, n: int, weight: float = 1.0) -> DatumArrays:
    rng = np.random.default_rng(seed)
    weights = np.full(n, weight, np.float32)
    return DatumArrays(rng.integers(0, VOCAB, n), {"target_tokens": rng.integers(0, VOCAB, n), "weights": weights})


def engine(model_dir, max_batch_tokens: int):
    e = build_torch_engine(model_dir, "tiny", "dense", max_lora_rank=16, max_seq_len=64,
                           num_threads=2, max_batch_tokens=max_batch_tokens)
    for i, rank in enumerate((4, 8, 2)):
        e.create_adapter(f"a{i}", LoraSpec(rank=rank, alpha=2.0 * rank, seed=i))
    return e


def batch() -> list[EngineItem]:
    return [
        EngineItem("x0", "a0", FB, [datum(1, 30), datum(2, 5), datum(3, 17)]),
        EngineItem("x1", "a1", FB, [datum(4, 9)]),
        EngineItem("x2", "a2", ItemKind.FORWARD, [datum(5, 24), datum(6, 3)]),
    ]


def test_plan_chunks_respects_the_padded_budget_and_keeps_row_order():
    chunks = plan_chunks(batch(), max_padded_tokens=40)
    for chunk in chunks:
        rows = [d for part in chunk for d in part.item.data]
        assert len(rows) * max(len(d.tokens) for d in rows) <= 40 or len(rows) == 1
    flat = [(part.index, len(d.tokens)) for chunk in chunks for part in chunk for d in part.item.data]
    assert flat == [(0, 30), (0, 5), (0, 17), (1, 9), (2, 24), (2, 3)]
    assert len(chunks) > 1
    assert len(plan_chunks(batch(), max_padded_tokens=10_000)) == 1


def _tokens(items: list[EngineItem], lane: list[int]) -> int:
    return sum(len(d.tokens) for i in lane for d in items[i].data)


def test_plan_lanes_keeps_each_adapter_in_one_lane_and_balances_tokens():
    items = [EngineItem(f"x{i}", f"a{i % 4}", FB, [datum(i, n)]) for i, n in enumerate((40, 30, 35, 25, 10, 20))]
    lanes = plan_lanes(items, 2)
    assert sorted(i for lane in lanes for i in lane) == list(range(len(items)))
    for lane in lanes:
        assert lane == sorted(lane)  # batch order within a lane
    lane_of = {items[i].adapter_id: n for n, lane in enumerate(lanes) for i in lane}
    assert all(lane_of[item.adapter_id] == n for n, lane in enumerate(lanes) for item in (items[i] for i in lane))
    # adapters by tokens: a0 50, a1 50, a2 35, a3 25; largest first onto the lighter lane: 85 / 75
    assert sorted(_tokens(items, lane) for lane in lanes) == [75, 85]
    assert len(plan_lanes(items, 3)) == 3 and len(plan_lanes(items, 8)) == 4  # at most a lane per adapter


def test_plan_lanes_declines_a_split_that_would_not_pay():
    one_adapter = [EngineItem(f"x{i}", "a0", FB, [datum(i, 30)]) for i in range(4)]
    assert plan_lanes(one_adapter, 2) is None
    lopsided = [EngineItem("big", "a0", FB, [datum(1, 61)]), EngineItem("small", "a1", FB, [datum(2, 39)])]
    assert plan_lanes(lopsided, 2) is None  # 61 % of the tokens in one lane
    assert plan_lanes(lopsided, 2, max_share=0.61) == [[0], [1]]
    assert plan_lanes(batch(), 1) is None


def test_chunked_pass_equals_one_pass(tiny_dense_dir):
    whole, chunked = engine(tiny_dense_dir, 10_000), engine(tiny_dense_dir, 40)
    out_whole, out_chunked = whole.run_batch(batch()), chunked.run_batch(batch())
    for a, b in zip(out_whole, out_chunked):
        assert a.failure is None and b.failure is None
        assert a.metrics["loss:sum"] == pytest.approx(b.metrics["loss:sum"], rel=1e-5)
        for da, db in zip(a.outputs, b.outputs):
            np.testing.assert_allclose(da["logprobs"], db["logprobs"], rtol=1e-5, atol=1e-6)
    for e in (whole, chunked):
        e.optim_step("a0", AdamSpec(learning_rate=1e-2))
    for name, tensor in whole.adapter("a0").weights().items():
        np.testing.assert_allclose(tensor.numpy(), chunked.adapter("a0").weights()[name].numpy(), rtol=1e-5, atol=1e-7)


def test_an_item_whose_later_chunk_overflows_leaves_its_adapter_untouched(tiny_dense_dir):
    e = engine(tiny_dense_dir, 40)
    before = {a: e.adapter_digest(a) for a in ("a0", "a1")}
    bad = EngineItem("bad", "a0", FB, [datum(1, 30), datum(2, 5, weight=1e38)])  # rows land in two chunks
    good = EngineItem("good", "a1", FB, [datum(4, 9)])
    out = {o.item_id: o for o in e.run_batch([bad, good])}
    assert out["bad"].failure.reason == "NON_FINITE_LOSS" and out["bad"].outputs == []
    assert out["good"].failure is None
    assert e.adapter_digest("a0") == before["a0"]
    assert e.adapter_digest("a1") != before["a1"]  # the good item's gradients were kept


def test_an_unexpected_error_fails_only_the_item_that_raised(tiny_dense_dir, monkeypatch):
    def exploding(logprobs, inputs, config):
        raise RuntimeError("simulated engine bug")

    spec = loss_specs.LossSpec("explode", ("target_tokens",), ("weights",))
    monkeypatch.setitem(loss_specs.SPECS, "explode", spec)
    monkeypatch.setitem(losses.LOSSES, "explode", losses.LossDef(exploding, spec))
    e = engine(tiny_dense_dir, 10_000)
    twin = engine(tiny_dense_dir, 10_000)
    good = EngineItem("good", "a1", FB, [datum(4, 9)])
    out = {o.item_id: o for o in e.run_batch([EngineItem("boom", "a0", FB, [datum(1, 7)], loss_fn="explode"), good])}
    twin.run_batch([good])
    assert (out["boom"].failure.code, out["boom"].failure.reason) == (int(Code.INTERNAL), "ENGINE_ERROR")
    assert out["good"].failure is None
    assert e.adapter_digest("a1") == twin.adapter_digest("a1")
    assert e.adapter_digest("a0") == twin.adapter_digest("a0")
