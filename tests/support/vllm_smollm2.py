"""The vLLM sampling engine on SmolLM2-135M (the shared model cache), for the slow tests that
need a real `AsyncLLM`; skips where vLLM cannot serve it. `engine.children` are the
processes vLLM started (engine core, workers)."""

from __future__ import annotations

import os
import pathlib

import pytest

from tunemesh_common.models import SMOLLM2, ModelRegistry


def start_smollm2_vllm(max_lora_rank: int, max_seq_len: int, max_adapters: int):
    psutil = pytest.importorskip("psutil")
    from tunemesh_sampler.engine import build_engine
    from tunemesh_sampler.engine.vllm_engine import can_serve

    data_dir = pathlib.Path(os.environ.get("TUNEMESH_DATA_DIR", "~/.cache/tunemesh")).expanduser()
    registry = ModelRegistry.default(data_dir)
    entry, model_dir = registry.entry(SMOLLM2), registry.materialize(SMOLLM2)
    if why := can_serve(model_dir, entry.family):
        pytest.skip(why)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    engine = build_engine("vllm", model_dir, entry.name, entry.family, max_lora_rank=max_lora_rank,
                          max_seq_len=max_seq_len, max_adapters=max_adapters)
    engine.children = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    return engine
