"""Conformance of TrainingEngine implementations, through the protocol only.

Every engine must pass this suite: adapter lifecycle errors, per-item failures, forward
purity, gradient accumulation, and isolation of one item's non-finite loss or gradient.
"deepspeed" is a ZeRO-3 group of 2 CPU ranks (this process is rank 0); it is skipped when
deepspeed is not installed, and its every digest is checked equal on both ranks.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

from tunemesh.errors import AlreadyExistsError, Code, InvalidArgumentError, NotFoundError
from tunemesh_trainer.domain import AdamSpec, DatumArrays, EngineItem, ItemKind, LoraSpec
from tunemesh_trainer.engine import TrainingEngine, build_torch_engine

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 256
FB, FWD = ItemKind.FORWARD_BACKWARD, ItemKind.FORWARD
ADAM = AdamSpec(learning_rate=1e-2, weight_decay=0.01)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128,
    )
    torch.manual_seed(99)
    path = tmp_path_factory.mktemp("contract_tiny_dense")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


FACTORIES = {
    "torch": lambda d, _: build_torch_engine(d, "tiny", "dense", max_lora_rank=16, max_seq_len=48, num_threads=2),
    "deepspeed": lambda d, group: group.build(
        model_dir=d, name="tiny", family="dense", max_lora_rank=16, max_seq_len=48, num_threads=1
    ),
}


@pytest.fixture(scope="module")
def rank_group():
    """Two ranks: this process and one worker subprocess."""
    import torch

    pytest.importorskip("deepspeed")
    from tunemesh_trainer.ranks import shared_local_group

    threads = torch.get_num_threads()
    yield shared_local_group(2, threads=1, timeout_s=120)  # one per process, closed at exit
    torch.set_num_threads(threads)


@pytest.fixture(params=sorted(FACTORIES))
def make_engine(request, model_dir):
    group = request.getfixturevalue("rank_group") if request.param == "deepspeed" else None
    return lambda: FACTORIES[request.param](model_dir, group)


def _datum(seed: int, n: int, weight: float | None = None) -> DatumArrays:
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.0, 1.0, n).astype(np.float32)
    if weight is not None:
        weights[-1] = weight
    return DatumArrays(rng.integers(0, VOCAB, n), {"target_tokens": rng.integers(0, VOCAB, n), "weights": weights})


def _item(item_id: str, adapter_id: str, data: list[DatumArrays], kind: ItemKind = FB, **kw) -> EngineItem:
    return EngineItem(item_id, adapter_id, kind, data, **kw)


def _with_adapters(engine: TrainingEngine, *ids: str) -> TrainingEngine:
    for seed, adapter_id in enumerate(ids):
        engine.create_adapter(adapter_id, LoraSpec(rank=2 + 2 * seed, alpha=8, seed=seed))
    return engine


def _probe(engine: TrainingEngine, adapter_id: str) -> np.ndarray:
    outcome = engine.run_batch([_item("probe", adapter_id, [_datum(1000, 10)], FWD)])[0]
    assert outcome.failure is None
    return outcome.outputs[0]["logprobs"]


def test_adapter_lifecycle_and_errors(make_engine):
    engine = make_engine()
    assert engine.create_adapter("b", LoraSpec(rank=4)) > 0
    assert engine.create_adapter("a", LoraSpec(rank=16, train_mlp=False)) > 0
    assert engine.adapter_ids() == ["a", "b"]
    with pytest.raises(AlreadyExistsError):
        engine.create_adapter("a", LoraSpec(rank=4))
    for rank in (0, engine.info.max_lora_rank + 1):
        with pytest.raises(InvalidArgumentError):
            engine.create_adapter("c", LoraSpec(rank=rank))
    for call in (engine.delete_adapter, engine.adapter_digest, lambda a: engine.optim_step(a, ADAM)):
        with pytest.raises(NotFoundError):
            call("nope")
    engine.delete_adapter("a")
    assert engine.adapter_ids() == ["b"]
    assert engine.run_batch([_item("x", "a", [_datum(1, 4)])])[0].failure.code == int(Code.NOT_FOUND)


def test_bad_items_fail_alone_and_outcomes_keep_order(make_engine):
    engine = _with_adapters(make_engine(), "a", "b", "c", "d")
    before = {a: engine.adapter_digest(a) for a in engine.adapter_ids()}
    bad_token = _datum(3, 5)
    bad_token.tokens[2] = VOCAB
    items = [
        _item("ok", "a", [_datum(1, 6), _datum(2, 9)]),
        _item("loss", "b", [_datum(3, 5)], loss_fn="no_such_loss"),
        _item("token", "c", [bad_token]),
        _item("fwd", "d", [_datum(4, 7)], FWD),
    ]
    outcomes = engine.run_batch(items)
    assert [o.item_id for o in outcomes] == ["ok", "loss", "token", "fwd"]
    assert (outcomes[1].failure.code, outcomes[1].failure.reason) == (int(Code.INVALID_ARGUMENT), "UNKNOWN_LOSS")
    assert (outcomes[2].failure.code, outcomes[2].failure.reason) == (int(Code.INVALID_ARGUMENT), "TOKEN_OUT_OF_RANGE")
    for outcome, lengths in ((outcomes[0], [6, 9]), (outcomes[3], [7])):
        assert outcome.failure is None
        assert [o["logprobs"].shape for o in outcome.outputs] == [(n,) for n in lengths]
        assert np.isfinite(outcome.metrics["loss:sum"])
        assert all(key.count(":") == 1 for key in outcome.metrics)
    assert engine.adapter_digest("a") != before["a"]
    assert [engine.adapter_digest(a) for a in "bcd"] == [before[a] for a in "bcd"]


def test_forward_is_pure_and_matches_forward_backward(make_engine):
    engine = _with_adapters(make_engine(), "a")
    engine.run_batch([_item("warm", "a", [_datum(5, 8)])])
    engine.optim_step("a", ADAM)
    digest = engine.adapter_digest("a")
    data = [_datum(6, 12), _datum(7, 3)]
    forward = engine.run_batch([_item("f", "a", data, FWD)])[0]
    assert engine.adapter_digest("a") == digest
    backward = engine.run_batch([_item("fb", "a", data)])[0]
    assert engine.adapter_digest("a") != digest
    assert forward.metrics["loss:sum"] == pytest.approx(backward.metrics["loss:sum"], rel=1e-6)
    for f, b in zip(forward.outputs, backward.outputs):
        np.testing.assert_allclose(f["logprobs"], b["logprobs"], rtol=1e-6, atol=1e-6)


def test_gradients_accumulate_until_optim_step(make_engine):
    d1, d2 = _datum(8, 11), _datum(9, 6)
    split, joint, shared = (_with_adapters(make_engine(), "a") for _ in range(3))
    start = _probe(split, "a")
    split.run_batch([_item("1", "a", [d1])])
    split.run_batch([_item("2", "a", [d2])])
    joint.run_batch([_item("12", "a", [d1, d2])])
    shared.run_batch([_item("1", "a", [d1]), _item("2", "a", [d2])])
    steps = [engine.optim_step("a", ADAM) for engine in (split, joint, shared)]
    assert [s["step:max"] for s in steps] == [1.0, 1.0, 1.0]
    assert all(key.count(":") == 1 for key in steps[0])
    assert steps[0]["grad_norm:max"] == pytest.approx(steps[1]["grad_norm:max"], rel=1e-5)
    probes = [_probe(engine, "a") for engine in (split, joint, shared)]
    assert np.abs(probes[0] - start).max() > 1e-3  # the step changed the model
    np.testing.assert_allclose(probes[0], probes[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probes[2], probes[1], rtol=1e-5, atol=1e-6)
    # the step cleared the accumulated gradients
    assert split.optim_step("a", ADAM)["grad_norm:max"] == 0.0


@pytest.mark.parametrize(("weight", "reason"), [(1e38, "NON_FINITE_LOSS"), (1e37, "NON_FINITE_GRADIENT")])
def test_non_finite_item_leaves_every_adapter_bit_identical(make_engine, weight, reason):
    ids = ("a", "bad", "c", "d")
    engine, twin = _with_adapters(make_engine(), *ids), _with_adapters(make_engine(), *ids)
    good = [
        _item("a", "a", [_datum(10, 16), _datum(11, 5)]),
        _item("c", "c", [_datum(12, 9)]),
        _item("d", "d", [_datum(13, 14)], FWD),
    ]
    bad = _item("bad", "bad", [_datum(14, 12, weight=weight), _datum(15, 3)])
    bad_before = engine.adapter_digest("bad")
    outcomes = engine.run_batch([good[0], bad, *good[1:]])
    twin_outcomes = twin.run_batch(good)

    assert (outcomes[1].failure.code, outcomes[1].failure.reason) == (int(Code.INVALID_ARGUMENT), reason)
    assert outcomes[1].outputs == []
    assert engine.adapter_digest("bad") == bad_before
    for got, want in zip([outcomes[0], *outcomes[2:]], twin_outcomes):
        assert got.failure is None and got.metrics == want.metrics
    for adapter_id in ("a", "c", "d"):
        assert engine.adapter_digest(adapter_id) == twin.adapter_digest(adapter_id)
    for adapter_id in ("a", "c"):
        assert engine.optim_step(adapter_id, ADAM) == twin.optim_step(adapter_id, ADAM)
        assert engine.adapter_digest(adapter_id) == twin.adapter_digest(adapter_id)
