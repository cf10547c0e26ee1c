"""Hypothesis profiles of the fuzz tests, and the in-process mesh they call.

Profiles (choose with `TUNEMESH_FUZZ_PROFILE`, default `ci`):

- `ci`: a bounded, reproducible run for the default `pytest`: few examples per test,
  `derandomize=True` (the same examples every run, on every machine), no example
  database, no deadline (a shared CI core is slow). The whole directory takes well under
  60 s on 2 cores.
- `dev`: a long local search: 50x the examples, random seeds, the example database under
  `.hypothesis/` so a failure found once is replayed first next time.

    TUNEMESH_FUZZ_PROFILE=dev .venv/bin/pytest tests/fuzz -q -p no:cacheprovider

A failure prints the falsifying example; add it to `corpus/` (see corpus/README.md) with
the fix, so it is replayed on every run without luck.
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "contract"))  # mesh_harness, loop_thread

CI_EXAMPLES = 25  # examples per property in the `ci` profile

_SHARED = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.function_scoped_fixture,
                                                     HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=CI_EXAMPLES, derandomize=True, database=None, print_blob=True, **_SHARED)
settings.register_profile("dev", max_examples=50 * CI_EXAMPLES, print_blob=True, **_SHARED)
settings.load_profile(os.environ.get("TUNEMESH_FUZZ_PROFILE", "ci"))


@pytest.fixture(scope="package")
def mesh(tmp_path_factory):
    """The contract tests' in-process mesh (scheduler servicers, real trainer, sampler and
    checkpoint service on the tiny dense model), for the RPC fuzz tests."""
    from loop_thread import LoopThread
    from mesh_harness import Mesh
    from tunemesh_common.models import TINY_DENSE, ModelRegistry
    from tunemesh_sampler.engine import build_torch_engine as build_sampling_engine
    from tunemesh_trainer.engine import build_torch_engine

    registry = ModelRegistry.default(tmp_path_factory.mktemp("fuzz_model_data"))
    entry, path = registry.entry(TINY_DENSE), registry.materialize(TINY_DENSE)
    shape = dict(name=entry.name, family=entry.family, max_lora_rank=entry.max_lora_rank,
                 max_seq_len=entry.max_seq_len, num_threads=1)
    engine, sampling_engine = build_torch_engine(path, **shape), build_sampling_engine(path, **shape)
    loop = LoopThread()
    mesh = Mesh(loop, engine, path, tmp_path_factory.mktemp("fuzz_checkpoints"), sampling_engine)
    yield mesh
    mesh.close()
    loop.close()
    sampling_engine.close()
