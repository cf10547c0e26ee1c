"""Fixtures of the contract tests."""

from __future__ import annotations

import pytest

from loop_thread import LoopThread
from mesh_harness import Mesh
from tunemesh_common.models import TINY_DENSE, ModelRegistry


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    from tunemesh_sampler.engine import build_torch_engine as build_sampling_engine
    from tunemesh_trainer.engine import build_torch_engine

    registry = ModelRegistry.default(tmp_path_factory.mktemp("scheduler_servicer_data"))
    entry, path = registry.entry(TINY_DENSE), registry.materialize(TINY_DENSE)
    engine = build_torch_engine(path, name=entry.name, family=entry.family, max_lora_rank=entry.max_lora_rank,
                                max_seq_len=entry.max_seq_len, num_threads=2)
    loop = LoopThread()
    sampling_engine = build_sampling_engine(path, name=entry.name, family=entry.family, max_lora_rank=entry.max_lora_rank,
                                            max_seq_len=entry.max_seq_len, num_threads=2)
    mesh = Mesh(loop, engine, path, tmp_path_factory.mktemp("checkpoints"), sampling_engine)
    yield mesh
    mesh.close()
    loop.close()
    sampling_engine.close()
