"""Makes tests/support (reference implementations shared by test suites) importable, and
keeps a running test mesh's CA from reaching tests that talk to plaintext servers."""

from __future__ import annotations

import pathlib
import sys

import pytest

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS / "support"))
MESH_SUITES = {"e2e", "fault"}  # their clients reach real meshes over TLS

from mesh_fixtures import mesh_ca_dir, model_data_dir, start_mesh  # noqa: E402,F401  (fixtures for every suite)


@pytest.fixture(autouse=True)
def _no_stray_mesh_ca(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """`start_mesh` sets TUNEMESH_CA_BUNDLE while a mesh runs, and session-scoped meshes
    run until the session ends: outside the mesh suites, where clients talk to in-process
    plaintext servers, it would turn them to TLS."""
    if pathlib.Path(str(request.node.path)).resolve().relative_to(TESTS).parts[0] not in MESH_SUITES:
        monkeypatch.delenv("TUNEMESH_CA_BUNDLE", raising=False)


@pytest.fixture
def exact_cuda_matmuls():
    """CUDA matmuls in full float32 (no TF32) for the test: GPU engines are checked against
    the CPU's numbers."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def two_threads():
    """torch on two threads for the test (what the engines use on a 2-core host), restored after."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)
