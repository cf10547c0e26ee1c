"""What the etcd metrics read: a registration's `etcd_up` / `lease_held` and a watcher's
`connected` follow etcd going away and coming back."""

from __future__ import annotations

import asyncio
import time

import pytest

from tunemesh_common.membership.etcd_process import EtcdProcess
from tunemesh_common.membership.registry import NodeRegistration, NodeWatcher

pytestmark = pytest.mark.e2e
TTL = 2


async def _until(predicate, timeout: float, state) -> None:
    """Wait until `predicate()` holds (AssertionError naming `state()` after `timeout`)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"not reached in {timeout}s: {state()}"
        await asyncio.sleep(0.1)


def test_etcd_loss_and_return_show_in_registration_and_watcher_state(etcd_process: EtcdProcess) -> None:
    async def scenario() -> None:
        endpoint = etcd_process.endpoint
        watcher = await NodeWatcher.start(endpoint, "trainers")
        reg = await NodeRegistration.start(endpoint, "trainers", "t9", b"record", ttl=TTL)
        state = lambda: dict(etcd_up=reg.etcd_up, lease_held=reg.lease_held, connected=watcher.connected)  # noqa: E731
        assert state() == dict(etcd_up=True, lease_held=True, connected=True)
        etcd_process.kill()
        await _until(lambda: not reg.etcd_up and not watcher.connected, TTL + 5, state)
        await _until(lambda: not reg.lease_held, TTL + 1, state)  # unconfirmed for a whole TTL
        etcd_process.start()
        await _until(lambda: reg.etcd_up and reg.lease_held and watcher.connected, 15, state)
        await reg.stop()
        await watcher.stop()

    asyncio.run(scenario())
