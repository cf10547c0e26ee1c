"""The sampler's engine factory: what `auto` device and dtype become, and the settings that
reach it from `python -m tunemesh_sampler`."""

from __future__ import annotations

import pytest
import torch

from tunemesh_sampler.engine import resolve_device, resolve_dtype


@pytest.mark.parametrize(("dtype", "on_gpu", "want"), [
    ("auto", True, "bfloat16"), ("auto", False, "float32"), ("float32", True, "float32"),
    ("bfloat16", False, "bfloat16"),
])
def test_auto_dtype_is_bfloat16_on_a_gpu_and_float32_on_cpu(dtype, on_gpu, want):
    assert resolve_dtype(dtype, on_gpu) == want


def test_auto_device_is_cuda_only_where_torch_sees_one():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"


def test_the_sampler_passes_its_engine_settings_to_the_factory(monkeypatch, tmp_path):
    from tunemesh_sampler import __main__ as sampler_main
    from tunemesh_sampler import engine as engine_pkg
    from tunemesh_sampler.settings import load

    seen = {}
    monkeypatch.setattr(engine_pkg, "build_engine", lambda kind, path, **kwargs: seen.update(kind=kind, **kwargs))
    s = load(["--data-dir", str(tmp_path), "--engine", "vllm", "--kv-cache-fraction", "0.4",
              "--kv-cache-bytes", "256MiB"])
    sampler_main.build_engine(s)
    assert (seen["kind"], seen["device"], seen["dtype"]) == ("vllm", "auto", "auto")
    assert (seen["kv_cache_fraction"], seen["kv_cache_bytes"]) == (0.4, 256 << 20)
