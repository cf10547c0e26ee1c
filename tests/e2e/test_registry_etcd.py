"""Registry against a real etcd: leases, watches, placement fencing, etcd restarts."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest

from tunemesh_internal.v1 import trainer_pb2
from tunemesh_common.membership import registry
from tunemesh_common.membership.etcd_process import EtcdProcess
from tunemesh_common.membership.registry import NodeRegistration, NodeWatcher, PlacementTable

pytestmark = pytest.mark.e2e
TTL = 2


def _node(node_id: str, adapters: int = 0) -> bytes:
    return trainer_pb2.TrainerNode(
        node_id=node_id, address="127.0.0.1:1", max_adapters=8, adapters=adapters
    ).SerializeToString()


async def _raw_nodes(endpoint: str) -> dict[str, bytes]:
    async with registry.connect(endpoint) as client:
        prefix = registry.node_prefix("trainers")
        return {kv.key[len(prefix):].decode(): kv.value for kv in await client.get_prefix(prefix)}


def test_registration_is_visible_and_revoked_on_stop(etcd_endpoint: str) -> None:
    async def scenario() -> None:
        reg = await NodeRegistration.start(etcd_endpoint, "trainers", "t0", _node("t0"), ttl=TTL)
        stored = (await _raw_nodes(etcd_endpoint))["t0"]
        assert trainer_pb2.TrainerNode.FromString(stored).node_id == "t0"
        await asyncio.sleep(TTL * 1.5)  # outlives the TTL only through keepalive
        await reg.update(_node("t0", adapters=3))
        assert trainer_pb2.TrainerNode.FromString((await _raw_nodes(etcd_endpoint))["t0"]).adapters == 3
        await reg.stop()
        assert await _raw_nodes(etcd_endpoint) == {}

    asyncio.run(scenario())


def test_crashed_node_expires_and_watcher_sees_add_update_remove(etcd_endpoint: str) -> None:
    async def scenario() -> None:
        seen: list[tuple[str, bytes | None]] = []
        watcher = await NodeWatcher.start(etcd_endpoint, "trainers", on_change=lambda n, v: seen.append((n, v)))
        assert watcher.nodes() == {}
        reg = await NodeRegistration.start(etcd_endpoint, "trainers", "t1", _node("t1"), ttl=TTL)
        await watcher.wait_for(lambda nodes: "t1" in nodes, timeout=5)
        await reg.update(_node("t1", adapters=2))
        await watcher.wait_for(lambda nodes: nodes.get("t1") == _node("t1", adapters=2), timeout=5)
        await reg.stop(revoke=False)  # crash: no revoke, no keepalive
        crashed_at = time.monotonic()
        assert "t1" in watcher.nodes()
        await watcher.wait_for(lambda nodes: "t1" not in nodes, timeout=TTL + 5)
        assert time.monotonic() - crashed_at > TTL / 2  # removed by expiry, not at once
        assert seen == [("t1", _node("t1")), ("t1", _node("t1", adapters=2)), ("t1", None)]
        await watcher.stop()

    asyncio.run(scenario())


def test_expire_ends_a_node_lease_at_once_and_a_live_node_registers_again(etcd_endpoint: str) -> None:
    async def scenario() -> None:
        seen: list[tuple[str, bytes | None]] = []
        watcher = await NodeWatcher.start(etcd_endpoint, "trainers", on_change=lambda n, v: seen.append((n, v)))
        reg = await NodeRegistration.start(etcd_endpoint, "trainers", "t2", _node("t2"), ttl=TTL)
        await watcher.wait_for(lambda nodes: "t2" in nodes, timeout=5)
        first = reg.lease_id
        assert watcher.lease_of("t2") == first and watcher.lease_of("nobody") is None
        assert await watcher.expire("t2", first + 1) is False  # not the lease its record is under
        assert "t2" in watcher.nodes()
        assert await watcher.expire("t2", first) is True
        # The node lives and renews its lease every TTL/3, so no lapse ends it: the record
        # goes because of `expire`, then the keepalive finds the lease gone and registers
        # the node under a new one.
        await watcher.wait_for(lambda nodes: watcher.lease_of("t2") not in (None, first), timeout=TTL + 10)
        assert watcher.lease_of("t2") == reg.lease_id != first
        assert [value is None for node, value in seen if node == "t2"] == [False, True, False]
        await reg.stop()
        await watcher.stop()

    asyncio.run(scenario())


def test_placement_is_fenced(etcd_endpoint: str) -> None:
    async def scenario() -> None:
        async with registry.connect(etcd_endpoint) as client:
            table = PlacementTable(client)
            assert await table.get_placement("r1") is None
            assert await table.place_run("r1", "a") is True
            assert await table.place_run("r1", "b") is False
            assert await table.place_run("r1", "a") is True  # idempotent for the owner
            first = await table.get_placement("r1")
            assert first is not None and first.node_id == "a"
            assert await table.move_run("r1", expected_node="b", new_node="c") is False
            assert await table.move_run("r1", "a", "b", expected_revision=first.mod_revision - 1) is False
            assert await table.move_run("r1", "a", "b", expected_revision=first.mod_revision) is True
            assert await table.move_run("r1", "a", "c") is False  # stale mover loses
            assert await table.place_run("r2", "c") is True
            assert await table.list_placements() == {"r1": "b", "r2": "c"}
            assert await table.release_run("r2", "a") is False
            assert await table.release_run("r2", "c") is True
            assert await table.list_placements() == {"r1": "b"}
            await table.put_run_metadata("r1", b"meta")
            assert await table.get_run_metadata("r1") == b"meta"
            assert await table.get_run_metadata("r9") is None

    asyncio.run(scenario())


def test_concurrent_placements_have_one_winner(etcd_endpoint: str) -> None:
    async def scenario() -> None:
        async with registry.connect(etcd_endpoint) as client:
            table = PlacementTable(client)
            results = await asyncio.gather(*(table.place_run("hot", f"n{i}") for i in range(8)))
            assert sum(results) == 1
            winner = f"n{results.index(True)}"
            assert (await table.get_placement("hot")).node_id == winner

    asyncio.run(scenario())


def test_etcd_restart_same_data_rewatches(etcd_process: EtcdProcess) -> None:
    async def scenario() -> None:
        endpoint = etcd_process.endpoint
        watcher = await NodeWatcher.start(endpoint, "trainers")
        reg = await NodeRegistration.start(endpoint, "trainers", "t2", _node("t2"), ttl=TTL)
        await watcher.wait_for(lambda nodes: "t2" in nodes, timeout=5)
        resyncs = watcher.resyncs
        etcd_process.kill()
        await asyncio.sleep(0.5)
        etcd_process.start()
        await reg.update(_node("t2", adapters=5))  # must reach the watcher over a new watch
        await watcher.wait_for(lambda nodes: nodes.get("t2") == _node("t2", adapters=5), timeout=10)
        assert watcher.resyncs > resyncs
        await asyncio.sleep(TTL * 1.5)  # lease still renewed after the restart
        assert "t2" in await _raw_nodes(endpoint)
        await reg.stop()
        await watcher.wait_for(lambda nodes: "t2" not in nodes, timeout=5)
        await watcher.stop()

    asyncio.run(scenario())


def test_etcd_restart_lost_data_reregisters_and_resyncs(etcd_process: EtcdProcess) -> None:
    async def scenario() -> None:
        endpoint = etcd_process.endpoint
        watcher = await NodeWatcher.start(endpoint, "trainers")
        alive = await NodeRegistration.start(endpoint, "trainers", "alive", _node("alive"), ttl=TTL)
        dead = await NodeRegistration.start(endpoint, "trainers", "dead", _node("dead"), ttl=TTL)
        await watcher.wait_for(lambda nodes: set(nodes) == {"alive", "dead"}, timeout=5)
        await dead.stop(revoke=False)
        etcd_process.kill()
        shutil.rmtree(etcd_process.data_dir)  # etcd comes back empty, revisions reset
        etcd_process.start()
        await watcher.wait_for(lambda nodes: set(nodes) == {"alive"}, timeout=10)
        assert "alive" in await _raw_nodes(endpoint)
        await alive.stop()
        await watcher.wait_for(lambda nodes: nodes == {}, timeout=5)
        await watcher.stop()

    asyncio.run(scenario())
