"""The scripted scheduler (`gateway_fakes.FakeUpstream`) as a fixture."""

from __future__ import annotations

import pytest
from gateway_fakes import FakeUpstream


@pytest.fixture
def upstream() -> FakeUpstream:
    return FakeUpstream()
