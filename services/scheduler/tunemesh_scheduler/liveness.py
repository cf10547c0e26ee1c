"""Seeing a dead trainer before its lease lapses.

A trainer's runs move when its etcd lease lapses (`lease_ttl_s`, 5 s by default): the
only sign of death that a pause, a partition and a crash share. A crash often says more,
sooner: the process is gone, so its host refuses connections to its port. When a call
to a trainer fails UNAVAILABLE, `DeathWatch` connects to the trainer's address (again
after 0.1 and 0.3 s while it is accepted: a dying process breaks its calls a moment
before its port closes); a refused connection (nothing listens there) ends the trainer's lease at once, which
every scheduler sees as the trainer leaving, so its runs move seconds earlier.

Only a refusal counts. A paused or cut-off trainer still accepts connections (its kernel
does) or lets them time out, and is left to its lease. Ending the lease of a trainer
that lives after all (it closed its port while draining) is safe: it is what a lapse
does, the moved runs' calls to it are fenced by epoch, and it registers again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable

from tunemesh.errors import TunemeshError
from tunemesh_common.membership.registry import ETCD_ERRORS, parse_endpoint, short_error

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0
# A process being killed breaks its calls a moment before its port closes, so a probe
# made as a call breaks can still be accepted: it probes again after these pauses.
PROBE_AGAIN_S = (0.1, 0.3)


async def refuses_connections(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether `host:port` refuses a TCP connection (nothing listens there). A connection
    accepted, timed out or failing otherwise says nothing, and gives False."""
    host, port = parse_endpoint(address)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except ConnectionRefusedError:
        return True
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return False


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def local_leader_gone(leader_listen: str, own_listen: str) -> bool:
    """Whether the scheduler leader listening at `leader_listen` is surely dead, seen by a
    replica listening at `own_listen`: only replicas of one host on loopback (as `tunemesh
    up` runs them) probe, since a listen address elsewhere (a wildcard, a name) need not be
    where another replica reaches the leader; those are left to the leader's lease."""
    try:
        if not (_loopback(parse_endpoint(leader_listen)[0]) and _loopback(parse_endpoint(own_listen)[0])):
            return False
    except TunemeshError:  # not host:port: nothing to probe
        return False
    return await refuses_connections(leader_listen)


class DeathWatch:
    """Probes a trainer that failed a call; a refusal ends its lease (`expire`)."""

    def __init__(self, kind: str, address_of: Callable[[str], str], lease_of: Callable[[str], int | None],
                 expire: Callable[[str, int], Awaitable[bool]],
                 refuses: Callable[[str], Awaitable[bool]] = refuses_connections,
                 again_s: tuple[float, ...] = PROBE_AGAIN_S) -> None:
        self.kind = kind
        self._address_of, self._lease_of, self._expire, self._refuses = address_of, lease_of, expire, refuses
        self._again_s = again_s
        self._probing: dict[str, asyncio.Task] = {}
        self.expired = 0  # leases ended by a probe (for tests and logs)

    def suspect(self, node_id: str) -> None:
        """A call to `node_id` failed UNAVAILABLE: probe it, unless a probe is running."""
        if node_id in self._probing:
            return
        lease = self._lease_of(node_id)
        if lease is None:
            return  # gone already
        try:
            address = self._address_of(node_id)
        except TunemeshError:  # left the directory meanwhile
            return
        task = asyncio.ensure_future(self._probe(node_id, address, lease))
        self._probing[node_id] = task
        task.add_done_callback(lambda _t: self._probing.pop(node_id, None))

    async def _probe(self, node_id: str, address: str, lease: int) -> None:
        for pause in (0.0, *self._again_s):
            await asyncio.sleep(pause)
            if await self._refuses(address):
                break
        else:
            return
        log.warning("%s %s refuses connections at %s: ending its lease now, so its runs move", self.kind,
                    node_id, address)
        try:
            if await self._expire(node_id, lease):
                self.expired += 1
        except ETCD_ERRORS as err:
            log.warning("could not end the lease of %s %s (its runs move when it lapses): %s", self.kind, node_id,
                        short_error(err))

    async def close(self) -> None:
        tasks = list(self._probing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
