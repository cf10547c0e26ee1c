"""Scheduler leadership against a real etcd: one leader at a time, tokens that only grow,
a standby taking over when the leader resigns or its lease lapses, the leader noticing
an etcd it cannot reach, and the leader's store writes fenced by its token."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tunemesh_common.membership import leadership, registry
from tunemesh.errors import FailedPreconditionError
from tunemesh_scheduler.core.ports import StoreWrite
from tunemesh_scheduler.core.records import SessionRecord
from tunemesh_scheduler.durable import EtcdRunStore
from tunemesh_scheduler.liveness import local_leader_gone

pytestmark = pytest.mark.e2e
TTL = 2


def _session(name: str) -> SessionRecord:
    return SessionRecord(name=f"sessions/{name}", tenant="t", labels={}, create_time=1.0, last_heartbeat_time=1.0)


def test_one_leader_at_a_time_and_the_token_grows(etcd_endpoint: str) -> None:
    async def scenario() -> None:
        async with registry.connect(etcd_endpoint) as a, registry.connect(etcd_endpoint) as b:
            first = leadership.LeaderElection(a, "scheduler", b"a:1", TTL)
            second = leadership.LeaderElection(b, "scheduler", b"b:1", TTL)
            token = await asyncio.wait_for(first.campaign(), 10)
            standby = asyncio.ensure_future(second.campaign())
            await asyncio.sleep(TTL * 1.5)  # the leader keeps its lease: the standby waits
            assert not standby.done()
            await first.resign()
            assert await asyncio.wait_for(standby, 10) > token
            assert (await a.get(leadership.leader_key("scheduler"))).value == b"b:1"
            await second.resign()

    asyncio.run(scenario())


def test_a_standby_takes_over_when_the_leader_stops_renewing(etcd_endpoint: str) -> None:
    async def scenario() -> None:
        async with registry.connect(etcd_endpoint) as a, registry.connect(etcd_endpoint) as b:
            first = leadership.LeaderElection(a, "scheduler", b"a:1", TTL)
            await first.campaign()
            first._task.cancel()  # a frozen leader: its lease is no longer renewed
            second = leadership.LeaderElection(b, "scheduler", b"b:1", TTL)
            await asyncio.wait_for(second.campaign(), TTL * 4)
            await second.resign()

    asyncio.run(scenario())


def test_a_standby_ends_the_lease_of_a_leader_whose_port_refuses_connections(etcd_endpoint: str) -> None:
    long_ttl = 30  # a lapse cannot be what hands over within the test's bound

    async def scenario() -> None:
        with socket.socket() as dead:  # bound, not listening: refuses, as a killed leader's port
            dead.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{dead.getsockname()[1]}"
            async with registry.connect(etcd_endpoint) as a, registry.connect(etcd_endpoint) as b:
                first = leadership.LeaderElection(a, "scheduler", address.encode(), long_ttl)
                await first.campaign()
                first._task.cancel()  # killed: its lease is no longer renewed, nor revoked
                second = leadership.LeaderElection(
                    b, "scheduler", b"127.0.0.1:2", long_ttl,
                    gone=lambda leader: local_leader_gone(leader.decode(), "127.0.0.1:2"))
                await asyncio.wait_for(second.campaign(), long_ttl / 2)
                assert (await b.get_lease_info(first._lease.id, keys=False)).TTL == -1  # ended, not lapsed
                await second.resign()

    asyncio.run(scenario())


def test_a_leader_that_cannot_reach_etcd_knows_it_lost(etcd_process) -> None:
    async def scenario() -> None:
        async with registry.connect(etcd_process.endpoint) as client:
            election = leadership.LeaderElection(client, "scheduler", b"a:1", TTL)
            await election.campaign()
            etcd_process.kill()
            try:
                await asyncio.wait_for(election.lost.wait(), TTL * 4)
            finally:
                etcd_process.start()

    asyncio.run(scenario())


def test_a_deposed_leaders_store_writes_are_refused(etcd_endpoint: str) -> None:
    async def scenario() -> None:
        async with registry.connect(etcd_endpoint) as a, registry.connect(etcd_endpoint) as b:
            first = leadership.LeaderElection(a, "scheduler", b"a:1", TTL)
            store = EtcdRunStore(a)
            store.fence(first.key, await first.campaign())
            await store.apply([StoreWrite(_session("s1"))])
            first._task.cancel()
            second = leadership.LeaderElection(b, "scheduler", b"b:1", TTL)
            await asyncio.wait_for(second.campaign(), TTL * 4)  # the first one's lease lapsed
            with pytest.raises(FailedPreconditionError) as err:
                await store.apply([StoreWrite(_session("s2"))])
            assert err.value.reason == "NOT_LEADER"
            assert [s.name for s in (await store.load()).sessions] == ["sessions/s1"]
            await second.resign()

    asyncio.run(scenario())
