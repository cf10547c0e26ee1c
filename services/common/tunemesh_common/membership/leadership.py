"""Leadership of a role among replicas (the scheduler's), through etcd.

The leader holds `/tunemesh/leaders/{role}` under its lease. The key's create revision
is its fencing token: peers refuse calls with a lower token than they saw, and the
leader's etcd writes compare it, so a deposed leader can act on nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aetcd

from tunemesh_common.membership.registry import ETCD_ERRORS, ROOT, short_error, until_reachable

logger = logging.getLogger(__name__)


def leader_key(role: str) -> bytes:
    return f"{ROOT}/leaders/{role}".encode()


class LeaderElection:
    """Leadership of one role among replicas, by a key held under the leader's lease.

    `campaign()` returns once this replica holds `/tunemesh/leaders/{role}` (created by a
    `version == 0` transaction, never lock-then-write) and gives the key's create
    revision: a fencing token that only grows from one leader to the next. Peers refuse
    calls carrying a lower token than the highest they saw. `lost` is set when the
    lease can no longer be confirmed within its TTL (etcd gone, partition, pause): the
    leader must stop acting at once, since a standby may take over after the TTL.

    `gone(value)`, if given, says whether the leader named by the key's value is surely
    dead (its process is gone: its port refuses connections). A standby asks it about a
    leader whose lease went unrenewed for 2 s, and ends that lease at once when it is:
    taking over then costs ~2-3 s instead of the TTL. A paused or cut-off leader is not
    "gone" and keeps its lease until it lapses.
    """

    def __init__(self, client: aetcd.Client, role: str, value: bytes, ttl: int = 5,
                 gone: Callable[[bytes], Awaitable[bool]] | None = None) -> None:
        self._client = client
        self.key = leader_key(role)
        self._value = value
        self.ttl = ttl
        self._gone = gone
        self.token = 0
        self.lost = asyncio.Event()
        self._lease: aetcd.Lease | None = None
        self._task: asyncio.Task | None = None

    async def campaign(self) -> int:
        """Wait until this replica leads; returns the fencing token. A standby polls the
        key about once a second (bounded calls: a watch or a refresh can hang for minutes
        while etcd restarts) and tries again under a fresh lease once it is gone."""
        txn = self._client.transactions
        while True:
            lease = await until_reachable("take a lease", lambda: self._bounded(self._client.lease(self.ttl)))
            self._confirmed = time.monotonic()
            ok, _ = await until_reachable(f"campaign for {self.key.decode()}", lambda: self._bounded(
                self._client.transaction(
                    compare=[txn.version(self.key) == 0],
                    success=[txn.put(self.key, self._value, lease=lease)],
                    failure=[],
                )))
            if ok:
                self._lease = lease
                held = await until_reachable("read the leader key", lambda: self._bounded(self._client.get(self.key)))
                self.token = held.create_revision
                self._task = asyncio.create_task(self._keep(), name="leader-lease")
                logger.info("leading %s (token %d)", self.key.decode(), self.token)
                return self.token
            await self._wait_vacant()

    async def _bounded(self, call):
        """`call` within half a lease TTL (TimeoutError counts as etcd unreachable)."""
        try:
            async with asyncio.timeout(self.ttl / 2):
                return await call
        except TimeoutError:
            raise aetcd.ConnectionTimeoutError("etcd did not answer in time") from None

    async def _wait_vacant(self) -> None:
        """Return once the leader key is gone (or its holder surely died, see `gone`)."""
        while True:
            try:
                held = await self._bounded(self._client.get(self.key))
                if held is None or await self._holder_died(held):
                    return
            except ETCD_ERRORS as err:
                logger.warning("standing by for %s: %s", self.key.decode(), short_error(err))
            await asyncio.sleep(min(1.0, self.ttl / 4))

    async def _holder_died(self, held) -> bool:
        """Whether the key's holder is surely dead: then its lease is ended here."""
        if self._gone is None or not held.lease:
            return False
        left = (await self._bounded(self._client.get_lease_info(held.lease, keys=False))).TTL
        if left > self.ttl - 2 or not await self._gone(held.value):
            return False  # renewed lately, or not surely dead: its lease decides
        logger.warning("the leader of %s at %s is gone (its lease has %ss left): ending its lease",
                       self.key.decode(), held.value.decode(errors="replace"), left)
        await self._bounded(self._client.revoke_lease(held.lease))
        return True

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 4)
            try:
                reply = await self._bounded(self._lease.refresh())
                held = reply is not None and reply.TTL > 0
            except ETCD_ERRORS as err:
                logger.warning("leader lease keepalive failed: %s", short_error(err))
                held = None
            if held:
                self._confirmed = time.monotonic()
            elif held is False or time.monotonic() - self._confirmed > self.ttl * 0.8:
                logger.error("lost the leadership of %s (lease not confirmed)", self.key.decode())
                self.lost.set()
                return

    async def resign(self) -> None:
        """Give the role up now (clean stop): a standby takes over without waiting."""
        if self._task is not None:
            self._task.cancel()
        if self._lease is not None:
            try:
                await self._lease.revoke()
            except ETCD_ERRORS as err:
                logger.info("revoking the leader lease: %s", short_error(err))
