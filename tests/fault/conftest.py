"""The fault suite's mesh: one per session (etcd, a checkpoint service, two tiny-dense
trainers, a torch sampler, two scheduler replicas) on loopback; `fault_ops` kills and restarts its processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fault_ops import ENV, MODEL

from tunemesh_local.state import MeshState


@pytest.fixture(scope="session")
def fault_mesh(start_mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshState]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in ENV.items():
            patch.setenv(name, value)
        with start_mesh(tmp_path_factory.mktemp("fault-mesh"), trainers=2, models=(MODEL, MODEL),
                        schedulers=2, samplers=1) as running:
            yield running


@pytest.fixture(scope="session")
def twin(fault_mesh: MeshState) -> list[dict]:
    """The untouched twin of the suite's workload (`twin_runs.train_pair`), no fault."""
    from twin_runs import train_pair

    return train_pair(fault_mesh.scheduler_address)
