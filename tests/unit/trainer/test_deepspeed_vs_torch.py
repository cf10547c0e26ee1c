"""Two ZeRO-3 CPU ranks (gloo) give the single-process torch engine's numbers.

Losses, logprobs, expert-usage metrics, LoRA gradients (read as AdamW's exp_avg after a
step with beta1 = 0, which is exactly the gradient), and the weights after the step, on
tiny dense and tiny MoE (with expert LoRA), with rows split unevenly across the ranks, an
item spanning both, and a batch whose one row leaves a rank idle. On tiny MoE also with
expert parallelism over both ranks (each holds 2 of the 4 experts of every layer).
"""

from __future__ import annotations

import numpy as np
import pytest

from tunemesh_trainer.domain import AdamSpec, DatumArrays, EngineItem, ItemKind, LoraSpec
from tunemesh_trainer.engine import build_torch_engine

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow  # two processes: ~25 s for the module

FB, FWD = ItemKind.FORWARD_BACKWARD, ItemKind.FORWARD
ADAM = AdamSpec(learning_rate=1e-2, beta1=0.0, weight_decay=0.01)
RTOL, ATOL = 1e-5, 1e-6
SPECS = {
    "a": LoraSpec(rank=4, alpha=8, seed=1, train_experts=True),
    "b": LoraSpec(rank=2, alpha=4, seed=2, train_mlp=False),
    "c": LoraSpec(rank=8, alpha=8, seed=3),
}


@pytest.fixture(scope="module")
def rank_group():
    import torch

    from tunemesh_trainer.ranks import shared_local_group

    threads = torch.get_num_threads()
    yield shared_local_group(2, threads=1, timeout_s=120)  # one per process, closed at exit
    torch.set_num_threads(threads)


def _datum(rng: np.random.Generator, n: int) -> DatumArrays:
    weights = rng.uniform(0.0, 1.0, n).astype(np.float32)
    return DatumArrays(rng.integers(0, 256, n), {"target_tokens": rng.integers(0, 256, n), "weights": weights})


def _batches(seed: int) -> list[list[EngineItem]]:
    rng = np.random.default_rng(seed)
    mixed = [
        EngineItem("a1", "a", FB, [_datum(rng, n) for n in (5, 17, 9)]),  # spans both ranks
        EngineItem("b1", "b", FB, [_datum(rng, 30)]),
        EngineItem("c1", "c", FWD, [_datum(rng, 11), _datum(rng, 4)]),
        EngineItem("a2", "a", FB, [_datum(rng, 6)]),
    ]
    lonely = [EngineItem("c2", "c", FB, [_datum(rng, 13)])]  # rank 1 runs an idle pass
    return [mixed, lonely]


def _engines(group, model_dir, family: str, expert_parallel: int = 1):
    kwargs = dict(name="tiny", family=family, max_lora_rank=16, max_seq_len=48, max_batch_tokens=64)
    torch_engine = build_torch_engine(model_dir, num_threads=1, **kwargs)
    ds_engine = group.build(model_dir=model_dir, num_threads=1, expert_parallel=expert_parallel, **kwargs)
    for engine in (torch_engine, ds_engine):
        for adapter_id, spec in SPECS.items():
            engine.create_adapter(adapter_id, spec)
    return torch_engine, ds_engine


def _assert_outcomes_close(got, want, exact: bool = False) -> None:
    """Close; with `exact` (same weights on both sides) the logprobs are bit-identical:
    the engines are batch-invariant, so a row's numbers do not depend on the rank that ran
    it (the gradients are summed across ranks in another order, so weights after a step
    differ in the last bits)."""
    for g, w in zip(got, want, strict=True):
        assert g.failure is None and w.failure is None
        assert g.metrics.keys() == w.metrics.keys()
        for key, value in w.metrics.items():
            assert g.metrics[key] == pytest.approx(value, rel=RTOL, abs=ATOL), key
        assert len(g.outputs) == len(w.outputs)
        for go, wo in zip(g.outputs, w.outputs):
            if exact:
                assert np.array_equal(go["logprobs"], wo["logprobs"])
            np.testing.assert_allclose(go["logprobs"], wo["logprobs"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("family", "expert_parallel"), [("dense", 1), ("moe", 1), ("moe", 2)],
                         ids=["dense", "moe", "moe-ep2"])
def test_two_ranks_match_one_process(rank_group, tiny_dense_dir, tiny_moe_dir, family, expert_parallel):
    model_dir = tiny_dense_dir if family == "dense" else tiny_moe_dir
    torch_engine, ds_engine = _engines(rank_group, model_dir, family, expert_parallel)
    for batch in _batches(seed=7):
        want = torch_engine.run_batch(batch)
        _assert_outcomes_close(ds_engine.run_batch(batch), want, exact=True)
        assert ("e_tokens_per_expert:max" in want[0].metrics) == (family == "moe")
    grads = {a: {n: t.clone() for n, t in torch_engine.adapter(a).accumulated_grads().items()} for a in SPECS}
    for adapter_id in ("a", "b", "c"):
        want = torch_engine.optim_step(adapter_id, ADAM)
        got = ds_engine.optim_step(adapter_id, ADAM)
        assert got["grad_norm:max"] == pytest.approx(want["grad_norm:max"], rel=RTOL)
        state = ds_engine.export_adapter(adapter_id, with_optimizer=True)
        reference = torch_engine.export_adapter(adapter_id, with_optimizer=True)
        assert state.weights.keys() == reference.weights.keys()
        for name, weight in reference.weights.items():
            np.testing.assert_allclose(state.optimizer[f"{name}/exp_avg"], grads[adapter_id][name].numpy(),
                                       rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(state.weights[name], weight, rtol=RTOL, atol=ATOL)
        ds_engine.adapter_digest(adapter_id)  # raises unless both ranks hold the same state
    after = _batches(seed=9)[0]
    _assert_outcomes_close(ds_engine.run_batch(after), torch_engine.run_batch(after))


def test_ranks_load_the_base_partitioned_and_leave_later_loads_alone(rank_group, tiny_dense_dir):
    import logging

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        rank_group.build(model_dir=tiny_dense_dir, name="tiny", family="dense", max_lora_rank=16, max_seq_len=48)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert any("zero.init()" in m for m in messages), messages  # built under zero.Init: a shard per rank
    plain = build_torch_engine(tiny_dense_dir, name="tiny", family="dense", max_lora_rank=16, max_seq_len=48)
    assert not any(hasattr(p, "ds_id") for p in plain.model.parameters())


def test_bf16_base_on_two_expert_parallel_ranks_follows_one_process(rank_group, tiny_moe_dir):
    kwargs = dict(name="tiny", family="moe", max_lora_rank=16, max_seq_len=48, max_batch_tokens=64, dtype="bfloat16")
    torch_engine = build_torch_engine(tiny_moe_dir, num_threads=1, **kwargs)
    ds_engine = rank_group.build(model_dir=tiny_moe_dir, num_threads=1, expert_parallel=2, **kwargs)
    for engine in (torch_engine, ds_engine):
        engine.create_adapter("a", SPECS["a"])
    batch = [item for item in _batches(seed=7)[0] if item.adapter_id == "a"]
    for got, want in zip(ds_engine.run_batch(batch), torch_engine.run_batch(batch), strict=True):
        assert got.failure is None and want.failure is None
        assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=1e-2)
    step = ds_engine.optim_step("a", ADAM)["grad_norm:max"]
    assert step == pytest.approx(torch_engine.optim_step("a", ADAM)["grad_norm:max"], rel=5e-2)
