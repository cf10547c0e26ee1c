"""bench/machine.py: model shapes from a config, FLOP and byte counts, the roofline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
from machine import ModelShape, sampling_bound  # noqa: E402

SHAPE = ModelShape(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=10)


def test_shape_from_a_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 10}))
    assert ModelShape.from_config(tmp_path) == SHAPE


def test_flops_and_elements_by_hand():
    # per layer: q 8x8, k 8x4, v 8x4, o 8x8, gate 8x16, up 8x16, down 16x8 = 576 weights
    assert SHAPE.weight_elements() == 2 * 576 + 8 * 10
    assert SHAPE.token_flops(0, 0, False) == 2 * 2 * 576
    lora = 2 * 3 * sum(i + o for i, o in SHAPE.linear_shapes())  # rank 3
    attention = 4 * 2 * 4 * 5  # 5 positions
    assert SHAPE.token_flops(3, 5, True) == 2 * (2 * 576 + lora + attention) + 2 * 8 * 10
    assert SHAPE.kv_elements(5) == 2 * 2 * 1 * 4 * 5


def test_roofline_takes_the_slower_of_compute_and_memory():
    compute_bound = sampling_bound(SHAPE, rows=64, prompt_len=4, new_tokens=3, lora_rank=0, peak_gflops=1e-6,
                                   copy_gb_s=1e6)
    assert compute_bound["compute_bound_steps"] == compute_bound["steps"] == 2
    memory_bound = sampling_bound(SHAPE, rows=1, prompt_len=4, new_tokens=3, lora_rank=0, peak_gflops=1e6,
                                  copy_gb_s=1e-6)
    assert memory_bound["compute_bound_steps"] == 0
    step_bytes = [(SHAPE.weight_elements() + SHAPE.kv_elements(c)) * 4 for c in (5, 6)]
    assert memory_bound["decode_s"] == pytest.approx(sum(step_bytes) / 1e3, rel=1e-3)
    seconds = memory_bound["prefill_s"] + memory_bound["decode_s"]
    assert memory_bound["tokens_per_s"] == pytest.approx(3 / seconds, abs=0.05)


def test_training_flops_by_hand():
    one = SHAPE.training_flops(rows=1, seq_len=1, lora_rank=0)
    assert one == 2 * SHAPE.token_flops(0, 0, True) + 3 * (SHAPE.token_flops(0, 1, False) - SHAPE.token_flops(0, 0, False))
    with_lora = SHAPE.training_flops(rows=1, seq_len=1, lora_rank=2)
    assert with_lora - one == 3 * 2 * 2 * 2 * sum(i + o for i, o in SHAPE.linear_shapes())
    assert SHAPE.training_flops(rows=3, seq_len=4, lora_rank=2) == 3 * SHAPE.training_flops(1, 4, 2)


def test_best_peaks_keeps_the_best_of_each_ceiling():
    from machine import best_peaks

    quiet = {"threads": 2, "fp32_gflops": 180.0, "bf16_gflops": 400.0, "copy_gb_s": 30.0}
    busy = {"threads": 2, "fp32_gflops": 70.0, "bf16_gflops": 450.0, "copy_gb_s": 20.0}
    assert best_peaks(busy, None, quiet) == {"threads": 2, "fp32_gflops": 180.0, "bf16_gflops": 450.0,
                                             "copy_gb_s": 30.0}
