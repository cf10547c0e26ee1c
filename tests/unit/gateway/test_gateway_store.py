"""The in-memory GatewayStore keeps the store contract."""

from __future__ import annotations

import asyncio

from gateway_store_conformance import check_store

from tunemesh_gateway.store import MemoryStore


def test_memory_store_keeps_the_contract():
    asyncio.run(check_store(MemoryStore()))
