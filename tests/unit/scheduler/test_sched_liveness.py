"""DeathWatch: a trainer whose port refuses connections loses its lease at once; one that
accepts them, or whose record moved to another lease meanwhile, keeps it. Loopback
sockets only: a socket bound without listening refuses, a listening one accepts."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from tunemesh_scheduler.liveness import DeathWatch, local_leader_gone, refuses_connections


@contextlib.contextmanager
def refusing_port():
    """A loopback port that refuses connections (bound, not listening) while held."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


class Leases:
    def __init__(self, **leases: int) -> None:
        self.leases = dict(leases)
        self.expired: list[tuple[str, int]] = []

    def lease_of(self, node_id: str) -> int | None:
        return self.leases.get(node_id)

    async def expire(self, node_id: str, lease: int) -> bool:
        if self.leases.get(node_id) != lease:
            return False
        self.expired.append((node_id, lease))
        del self.leases[node_id]
        return True


async def _settle(watch: DeathWatch) -> None:
    while watch._probing:
        await asyncio.gather(*watch._probing.values())


def test_refused_and_accepted_connections() -> None:
    async def scenario() -> None:
        with refusing_port() as address:
            assert await refuses_connections(address)
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            assert not await refuses_connections(f"127.0.0.1:{port}")

    asyncio.run(scenario())


def test_a_refusing_trainer_loses_its_lease_once() -> None:
    async def scenario() -> None:
        leases = Leases(t0=7)
        with refusing_port() as address:
            watch = DeathWatch("trainer", {"t0": address}.__getitem__, leases.lease_of, leases.expire)
            for _ in range(3):  # every failing call of the batch reports it; one probe runs
                watch.suspect("t0")
            assert len(watch._probing) == 1
            await _settle(watch)
            watch.suspect("t0")  # gone from the view now: nothing to probe
            assert not watch._probing
        assert leases.expired == [("t0", 7)] and watch.expired == 1

    asyncio.run(scenario())


def test_an_accepting_trainer_keeps_its_lease() -> None:
    async def scenario() -> None:
        leases = Leases(t0=7)
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        async with server:
            address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
            watch = DeathWatch("trainer", {"t0": address}.__getitem__, leases.lease_of, leases.expire,
                               again_s=(0.0, 0.0))
            watch.suspect("t0")  # paused or cut off, not dead: left to its lease
            await _settle(watch)
        assert leases.expired == [] and leases.leases == {"t0": 7}

    asyncio.run(scenario())


def test_a_trainer_whose_port_closes_a_moment_after_its_calls_broke_loses_its_lease() -> None:
    async def scenario() -> None:
        leases = Leases(t0=7)
        answers = iter([False, False, True])  # accepted while the process is being torn down

        async def refuses(address: str) -> bool:
            return next(answers)

        watch = DeathWatch("trainer", lambda n: "127.0.0.1:1", leases.lease_of, leases.expire, refuses=refuses,
                           again_s=(0.0, 0.0))
        watch.suspect("t0")
        await _settle(watch)
        assert leases.expired == [("t0", 7)]

    asyncio.run(scenario())


def test_a_node_registered_again_meanwhile_keeps_its_new_lease() -> None:
    async def scenario() -> None:
        leases = Leases(t0=7)
        probed = asyncio.Event()

        async def refuses(address: str) -> bool:
            leases.leases["t0"] = 8  # it came back under a new lease while the probe ran
            probed.set()
            return True

        watch = DeathWatch("trainer", lambda n: "127.0.0.1:1", leases.lease_of, leases.expire, refuses=refuses)
        watch.suspect("t0")
        await _settle(watch)
        assert probed.is_set() and leases.expired == [] and leases.leases == {"t0": 8}

    asyncio.run(scenario())


def test_only_replicas_of_one_host_on_loopback_probe_the_leader() -> None:
    async def scenario() -> None:
        with refusing_port() as address:
            assert await local_leader_gone(address, "127.0.0.1:9")
            port = address.rpartition(":")[2]
            # A wildcard or another host's address need not be where this replica reaches
            # the leader: never probed, left to the lease.
            assert not await local_leader_gone(f"0.0.0.0:{port}", "127.0.0.1:9")
            assert not await local_leader_gone(address, "0.0.0.0:9")
            assert not await local_leader_gone(address, "10.1.2.3:9")
            assert not await local_leader_gone("not an address", "127.0.0.1:9")
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        async with server:
            assert not await local_leader_gone(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", "127.0.0.1:9")

    asyncio.run(scenario())
