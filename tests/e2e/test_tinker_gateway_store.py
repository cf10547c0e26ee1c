"""The gateway's etcd-backed tables against a real etcd (the suite's `etcd_endpoint`):
the same contract as the in-memory store, and they outlive the client that wrote them."""

from __future__ import annotations

import asyncio
import pathlib
import sys

import pytest

UNIT = pathlib.Path(__file__).resolve().parents[1] / "unit" / "gateway"
sys.path.insert(0, str(UNIT))  # the shared store suite

from gateway_store_conformance import check_store  # noqa: E402

from tunemesh_common.membership import registry  # noqa: E402
from tunemesh_gateway.core import SamplerEntry  # noqa: E402
from tunemesh_gateway.etcd_store import EtcdStore  # noqa: E402

pytestmark = pytest.mark.e2e


def test_etcd_store_keeps_the_contract_and_survives_a_new_client(etcd_endpoint):
    async def body():
        client = registry.connect(etcd_endpoint)
        try:
            await check_store(EtcdStore(client))
        finally:
            await client.close()
        again = registry.connect(etcd_endpoint)  # as a restarted gateway
        try:
            store = EtcdStore(again)
            assert await store.run_of("s:train:0") == "runs/r1"
            held = await store.sampler_for_seq("s", 1)
            assert held is not None and held.sampler_id in ("ss1", "ss2")
            assert await store.put_sampler(SamplerEntry("ss9", "m", "", "o"), "s", 1) == held
        finally:
            await again.close()

    asyncio.run(body())


def test_an_unreachable_etcd_is_unavailable():
    from tunemesh.errors import UnavailableError

    async def body():
        client = registry.connect("127.0.0.1:1", timeout=1.0)
        try:
            with pytest.raises(UnavailableError, match="GATEWAY_STORE_UNAVAILABLE"):
                await EtcdStore(client).run_of("s:train:0")
        finally:
            await client.close()

    asyncio.run(body())
