"""GPU-only: the engines on CUDA give the CPU torch engine's numbers (fp32, TF32 off).
Skipped on machines without CUDA devices (CI runs on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tunemesh_trainer.domain import AdamSpec, DatumArrays, EngineItem, ItemKind, LoraSpec
from tunemesh_trainer.engine import build_torch_engine

CUDA_DEVICES = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_cuda_matmuls"),
              pytest.mark.skipif(CUDA_DEVICES == 0, reason="needs a CUDA device")]
FB, FWD = ItemKind.FORWARD_BACKWARD, ItemKind.FORWARD
SPECS = {"a": LoraSpec(rank=4, alpha=8, seed=1, train_experts=True), "b": LoraSpec(rank=2, alpha=4, seed=2)}
RTOL, ATOL = 1e-4, 1e-5



def _batch(seed: int) -> list[EngineItem]:
    rng = np.random.default_rng(seed)

    def datum(n: int) -> DatumArrays:
        return DatumArrays(rng.integers(0, 256, n), {"target_tokens": rng.integers(0, 256, n),
                                                     "weights": rng.uniform(0, 1, n).astype(np.float32)})

    return [EngineItem("a1", "a", FB, [datum(9), datum(21)]), EngineItem("b1", "b", FB, [datum(14)]),
            EngineItem("b2", "b", FWD, [datum(6)])]


def _build(model_dir, **kwargs):
    engine = build_torch_engine(model_dir, name="tiny", family="moe", max_lora_rank=16, max_seq_len=48, **kwargs)
    for adapter_id, spec in SPECS.items():
        engine.create_adapter(adapter_id, spec)
    return engine


def _assert_same_training(engine, reference) -> None:
    for seed in (3, 4):
        got, want = engine.run_batch(_batch(seed)), reference.run_batch(_batch(seed))
        for g, w in zip(got, want, strict=True):
            assert g.failure is None and w.failure is None
            assert g.metrics["loss:sum"] == pytest.approx(w.metrics["loss:sum"], rel=RTOL)
            for go, wo in zip(g.outputs, w.outputs, strict=True):
                np.testing.assert_allclose(go["logprobs"], wo["logprobs"], rtol=RTOL, atol=ATOL)
        for adapter_id in SPECS:
            adam = AdamSpec(learning_rate=1e-2)
            assert engine.optim_step(adapter_id, adam)["grad_norm:max"] == pytest.approx(
                reference.optim_step(adapter_id, adam)["grad_norm:max"], rel=RTOL)
    for adapter_id in SPECS:
        got = engine.export_adapter(adapter_id, with_optimizer=False).weights
        for name, weight in reference.export_adapter(adapter_id, with_optimizer=False).weights.items():
            np.testing.assert_allclose(got[name], weight, rtol=RTOL, atol=ATOL)


def test_torch_engine_on_cuda_matches_cpu(tiny_moe_dir):
    _assert_same_training(_build(tiny_moe_dir, device="cuda"), _build(tiny_moe_dir, device="cpu"))


@pytest.mark.skipif(CUDA_DEVICES < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("expert_parallel", [1, 2])
def test_two_gpu_ranks_match_the_cpu_engine(tiny_moe_dir, expert_parallel):
    pytest.importorskip("deepspeed")
    from tunemesh_trainer.ranks import shared_local_group

    group = shared_local_group(2, timeout_s=300)  # ranks on cuda:0 and cuda:1 (nccl)
    engine = group.build(model_dir=tiny_moe_dir, name="tiny", family="moe", max_lora_rank=16, max_seq_len=48,
                         expert_parallel=expert_parallel)
    for adapter_id, spec in SPECS.items():
        engine.create_adapter(adapter_id, spec)
    _assert_same_training(engine, _build(tiny_moe_dir, device="cpu"))
