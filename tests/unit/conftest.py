"""Unit tests talk to in-process plaintext servers: a mesh CA that a running test mesh put
in the environment (`start_mesh`) must not turn their clients to TLS."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_mesh_ca(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNEMESH_CA_BUNDLE", raising=False)
