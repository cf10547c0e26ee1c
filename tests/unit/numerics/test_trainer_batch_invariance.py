"""Batch invariance of the trainer's torch engine, as a property: an item's logprobs, loss
and the gradient it leaves in its adapter are bit-identical whether it runs alone or in a
random batch (other adapters, other lengths, forward and forward_backward items before and
after it, chunking by `max_batch_tokens`), for the dense and the MoE tiny models (expert
LoRA), with a float32 and a bfloat16 base, the base layers on MKL (as tiny layers run) and
on oneDNN (as SmolLM2's do). Each row is compared to the same row alone,
bit for bit."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from numerics_fixtures import base_layers_on, datum, random_adapter, tiny_model_dir
from tunemesh_trainer.domain import EngineItem, ItemKind

FB, FWD = ItemKind.FORWARD_BACKWARD, ItemKind.FORWARD
RANKS = {"mine": 4, "o1": 8, "o2": 2}
BUDGETS = (96, 8192)  # padded tokens per chunk: many chunks, or one


@functools.cache
def _engine(kind: str, dtype: str, budget: int):
    import pathlib
    import tempfile

    from tunemesh_trainer.engine import build_torch_engine

    root = pathlib.Path(tempfile.mkdtemp(prefix="tunemesh-invariance-"))
    return build_torch_engine(tiny_model_dir(kind, root), "tiny", kind, max_lora_rank=8, max_seq_len=128,
                              num_threads=2, max_batch_tokens=budget, dtype=dtype)


def _fresh_adapters(engine, kind: str) -> None:
    for seed, (adapter_id, rank) in enumerate(RANKS.items()):
        random_adapter(engine, adapter_id, rank, seed=seed + 1, experts=kind == "moe")


def _mine(seed: int, lengths: list[int]) -> EngineItem:
    return EngineItem("mine", "mine", FB, [datum(seed * 10 + i, n) for i, n in enumerate(lengths)])


def _run(engine, kind: str, items: list[EngineItem]):
    _fresh_adapters(engine, kind)
    outcome = next(o for o in engine.run_batch(items) if o.item_id == "mine")
    assert outcome.failure is None, outcome.failure
    return outcome, {k: v.clone() for k, v in engine.adapter("mine").accumulated_grads().items()}


companion = st.tuples(st.sampled_from(["o1", "o2"]), st.sampled_from([FB, FWD]),
                      st.lists(st.integers(1, 70), min_size=1, max_size=3))


@pytest.mark.parametrize("kind,dtype,layers", [("dense", "float32", "mkl"), ("dense", "bfloat16", "mkl"),
                                               ("moe", "float32", "mkl"), ("moe", "bfloat16", "mkl"),
                                               ("dense", "float32", "onednn"), ("dense", "bfloat16", "onednn"),
                                               ("moe", "float32", "onednn")])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=3), before=st.lists(companion, max_size=2),
       after=st.lists(companion, max_size=2), budget=st.sampled_from(BUDGETS), seed=st.integers(0, 1000))
def test_an_item_is_bit_identical_alone_and_in_any_batch(kind, dtype, layers, lengths, before, after, budget, seed):
    engine = _engine(kind, dtype, budget)
    others = [EngineItem(f"{adapter}-{i}", adapter, item_kind, [datum(seed + 100 * i + j, n) for j, n in enumerate(ns)])
              for i, (adapter, item_kind, ns) in enumerate([*before, *after])]
    batch = [*others[: len(before)], _mine(seed, lengths), *others[len(before):]]
    with base_layers_on(layers):
        alone, alone_grads = _run(engine, kind, [_mine(seed, lengths)])
        shared, shared_grads = _run(engine, kind, batch)
    for a, b in zip(alone.outputs, shared.outputs, strict=True):
        assert np.array_equal(a["logprobs"], b["logprobs"])
    assert alone.metrics["loss:sum"] == shared.metrics["loss:sum"]
    assert alone_grads.keys() == shared_grads.keys()
    for name, grad in alone_grads.items():
        assert torch.equal(grad, shared_grads[name]), name
