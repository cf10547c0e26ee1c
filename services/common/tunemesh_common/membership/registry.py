"""etcd membership and placement (asyncio, `aetcd`).

Key layout (all values are opaque bytes to this module):

    /tunemesh/nodes/{kind}/{node_id}     node record (e.g. a serialized
                                         tunemesh.internal.v1.TrainerNode), put under
                                         the node's lease: it vanishes when the node
                                         stops renewing (crash) or revokes (clean stop).
                                         kind: "trainers", "samplers".
    /tunemesh/placement/runs/{run_id}    node_id (utf-8) owning the run. Created only by
                                         a transaction `version == 0 -> put`; changed
                                         only by a transaction comparing the current
                                         owner (and optionally mod_revision): fencing,
                                         never lock-then-write.
    /tunemesh/runs/{run_id}              run metadata (opaque bytes), optional.

Watches: `NodeWatcher` reads the prefix, then watches from that read's revision + 1.
After any stream break (etcd restart, compaction, network) it re-reads the prefix and
watches again from the new revision, reporting the differences; this stays correct even
when etcd came back with an empty data dir (revisions reset).

One `aetcd.Client` belongs to one event loop; `connect()` builds one for an endpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
from typing import Awaitable, Callable

import aetcd
import grpc

from aetcd import rpc as aetcd_rpc
from aetcd import watcher as aetcd_watcher

from tunemesh.errors import InvalidArgumentError
from tunemesh_common.security.tls import MeshTls, identity_name

logger = logging.getLogger(__name__)

ROOT = "/tunemesh"
RETRY_DELAY_S = 0.5
ETCD_ERRORS = (aetcd.ClientError, grpc.RpcError, OSError)
_CHANNEL_OPTIONS = {
    "grpc.enable_http_proxy": 0,
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.max_receive_message_length": 512 * 1024 * 1024,  # a scheduler reads its whole state at start
    "grpc.keepalive_timeout_ms": 5_000,
}

Etcd = aetcd.Client | str
ChangeCallback = Callable[[str, bytes | None], Awaitable[None] | None]


def node_prefix(kind: str) -> bytes:
    return f"{ROOT}/nodes/{kind}/".encode()


def node_key(kind: str, node_id: str) -> bytes:
    _check_name("node_id", node_id)
    return node_prefix(kind) + node_id.encode()


def placement_prefix() -> bytes:
    return f"{ROOT}/placement/runs/".encode()


def placement_key(run_id: str) -> bytes:
    _check_name("run_id", run_id)
    return placement_prefix() + run_id.encode()


def run_key(run_id: str) -> bytes:
    _check_name("run_id", run_id)
    return f"{ROOT}/runs/{run_id}".encode()


def _check_name(field: str, value: str) -> None:
    if not value or "/" in value:
        raise InvalidArgumentError("BAD_ETCD_NAME", f"{field} must be non-empty without '/': {value!r}")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """`host:port` -> (host, port)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidArgumentError("BAD_ETCD_ENDPOINT", f"etcd endpoint must be host:port, got {endpoint!r}")
    return host, int(port)


def connect(endpoint: str, timeout: float = 5.0, tls: MeshTls | None = None) -> aetcd.Client:
    """A client for `host:port` (connects lazily on first call; bounded per-call timeout).
    With `tls`, over TLS to a server proving `etcd.tunemesh`, authenticated by this
    process's certificate (etcd takes its common name as the user)."""
    host, port = parse_endpoint(endpoint)
    if tls is None:
        return aetcd.Client(host=host, port=port, timeout=timeout, options=dict(_CHANNEL_OPTIONS))
    return TlsClient(tls, host=host, port=port, timeout=timeout, options=dict(_CHANNEL_OPTIONS))


class TlsClient(aetcd.Client):
    """aetcd's client over mutual TLS. aetcd 1.0 opens only plaintext channels: this
    replaces `connect` with one that opens a TLS channel and sets up the same stubs
    (no username/password: the certificate is the credential)."""

    def __init__(self, tls: MeshTls, **kwargs) -> None:
        super().__init__(**kwargs)
        self._tls = tls

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            self.channel = self._tls.channel(f"{self._host}:{self._port}", identity_name("etcd"),
                                             list(self._options.items()))
            self.kvstub = aetcd_rpc.KVStub(self.channel)
            self.clusterstub = aetcd_rpc.ClusterStub(self.channel)
            self.leasestub = aetcd_rpc.LeaseStub(self.channel)
            self.maintenancestub = aetcd_rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd_watcher.Watcher(aetcd_rpc.WatchStub(self.channel), timeout=self._timeout,
                                                  metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False


async def until_reachable(what: str, call: Callable[[], Awaitable], max_delay_s: float = 5.0):
    """`await call()` until etcd answers: a service that starts before etcd (or while it
    restarts) waits for it, logging each failed try, instead of exiting."""
    delay = RETRY_DELAY_S
    while True:
        try:
            return await call()
        except ETCD_ERRORS as err:
            logger.warning("waiting for etcd to %s: %s; retry in %.1fs", what, short_error(err), delay)
        await asyncio.sleep(delay)
        delay = min(max_delay_s, delay * 2)


def short_error(err: BaseException) -> str:
    """An etcd error in one short line (for logs)."""
    text = err.details() if isinstance(err, grpc.RpcError) and hasattr(err, "details") else str(err)
    return f"{type(err).__name__}: {text or ''}"[:200]


def _client_for(etcd: Etcd, tls: MeshTls | None = None) -> tuple[aetcd.Client, bool]:
    """(client, owned): a client built from an endpoint string (over TLS with `tls`) is
    owned by the caller."""
    if isinstance(etcd, str):
        return connect(etcd, tls=tls), True
    return etcd, False


class NodeRegistration:
    """A node's record under a lease, kept alive in the background.

    If the lease is lost (expired while etcd was unreachable, or etcd lost its data),
    the record is put again under a fresh lease. `etcd_up` and `lease_held` say how the
    last exchanges went (for metrics).
    """

    def __init__(self, client: aetcd.Client, owned: bool, kind: str, node_id: str, ttl: int) -> None:
        self._client = client
        self._owned = owned
        self.key = node_key(kind, node_id)
        self.node_id = node_id
        self.ttl = ttl
        self._value = b""
        self._lease: aetcd.Lease | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._follower: asyncio.Task | None = None  # see start_following
        self.etcd_up = False  # the last call to etcd succeeded
        self._confirmed = float("-inf")  # monotonic time etcd last confirmed the lease

    @classmethod
    async def start(cls, etcd: Etcd, kind: str, node_id: str, value: bytes, ttl: int = 5,
                    tls: MeshTls | None = None) -> NodeRegistration:
        """Register `value` at /tunemesh/nodes/{kind}/{node_id}; keep the lease alive every ttl/3."""
        if ttl < 2:
            raise InvalidArgumentError("BAD_LEASE_TTL", f"lease ttl must be >= 2 s, got {ttl}")
        client, owned = _client_for(etcd, tls)
        registration = cls(client, owned, kind, node_id, ttl)
        registration._value = value
        await until_reachable(f"register {node_id}", registration._register)
        registration._task = asyncio.create_task(registration._keep_alive(), name=f"keepalive-{node_id}")
        return registration

    @property
    def lease_id(self) -> int | None:
        return self._lease.id if self._lease else None

    @property
    def lease_held(self) -> bool:
        """Whether etcd confirmed the lease within its TTL (the record is visible)."""
        return self._lease is not None and time.monotonic() - self._confirmed < self.ttl

    async def update(self, value: bytes) -> None:
        """Replace the record (same lease; a new one if the lease is gone)."""
        async with self._lock:
            self._value = value
            try:
                await self._client.put(self.key, value, lease=self._lease)
                self.etcd_up = True
                return
            except aetcd.ClientError as err:
                self.etcd_up = False
                logger.warning("node %s: update failed (%s); registering again", self.node_id, err)
            await self._register_locked()

    @classmethod
    async def start_following(cls, etcd: Etcd, kind: str, node_id: str, value_of: Callable[[], bytes],
                              ttl: int = 5, period_s: float = 1.0, tls: MeshTls | None = None) -> NodeRegistration:
        """`start` with `value_of()`, then keep the record equal to it (`follow`) until `stop`."""
        registration = await cls.start(etcd, kind, node_id, value_of(), ttl=ttl, tls=tls)
        registration._follower = asyncio.create_task(registration.follow(value_of, period_s))
        return registration

    async def follow(self, value_of: Callable[[], bytes], period_s: float) -> None:
        """Keep the record equal to `value_of()`, checked every `period_s` (run as a task)."""
        last = self._value
        while True:
            await asyncio.sleep(period_s)
            value = value_of()
            if value != last:
                await self.update(value)
                last = value

    async def stop(self, revoke: bool = True) -> None:
        """Stop renewing; revoke the lease (record gone at once) unless `revoke=False` (crash)."""
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
            self._follower = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if revoke and self._lease is not None:
            try:
                await self._lease.revoke()
            except ETCD_ERRORS as err:
                logger.warning("node %s: lease revoke failed: %s", self.node_id, err)
        self._lease = None
        if self._owned:
            await self._client.close()

    async def _register(self) -> None:
        async with self._lock:
            await self._register_locked()

    async def _register_locked(self) -> None:
        try:
            self._lease = await self._client.lease(self.ttl)
            await self._client.put(self.key, self._value, lease=self._lease)
        except ETCD_ERRORS:
            self.etcd_up = False
            raise
        self.etcd_up, self._confirmed = True, time.monotonic()
        logger.info("node %s registered (lease %x, ttl %ss)", self.node_id, self._lease.id, self.ttl)

    async def _keep_alive(self) -> None:
        interval = self.ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                reply = await self._lease.refresh()
                self.etcd_up = True
                if reply is None or reply.TTL <= 0:
                    self._confirmed = float("-inf")
                    logger.warning("node %s: lease %x lost; registering again", self.node_id, self._lease.id)
                    await self._register()
                else:
                    self._confirmed = time.monotonic()
            except ETCD_ERRORS as err:
                self.etcd_up = False
                logger.warning("node %s: keepalive failed: %s", self.node_id, err)


class NodeWatcher:
    """An in-memory view node_id -> record bytes of one kind, kept current by a watch."""

    def __init__(self, client: aetcd.Client, owned: bool, kind: str, on_change: ChangeCallback | None) -> None:
        self._client = client
        self._owned = owned
        self.kind = kind
        self._prefix = node_prefix(kind)
        self._on_change = on_change
        self._nodes: dict[str, bytes] = {}
        self._leases: dict[str, int] = {}  # node_id -> the lease its record is under
        self._changed = asyncio.Condition()
        self._watch: aetcd.Watch | None = None
        self._task: asyncio.Task | None = None
        self.revision = 0
        self.resyncs = 0
        self.connected = False  # the last read or watch of etcd is good (for metrics)

    @classmethod
    async def start(cls, etcd: Etcd, kind: str, on_change: ChangeCallback | None = None) -> NodeWatcher:
        """Read the current nodes (waiting while etcd is unreachable), then follow changes.

        `on_change(node_id, value_or_None)` (sync or async) is called for every change,
        including differences found by a resync; None means the node is gone.
        """
        client, owned = _client_for(etcd)
        watcher = cls(client, owned, kind, on_change)
        await until_reachable(f"read the {kind}", watcher._resync)
        watcher._task = asyncio.create_task(watcher._follow(), name=f"watch-{kind}")
        return watcher

    def nodes(self) -> dict[str, bytes]:
        """A copy of the current view."""
        return dict(self._nodes)

    def lease_of(self, node_id: str) -> int | None:
        """The lease node `node_id`'s current record is under (None: not registered)."""
        return self._leases.get(node_id)

    async def expire(self, node_id: str, lease_id: int) -> bool:
        """End lease `lease_id` of node `node_id` now, as its lapse would: the record goes,
        every watcher sees the node leave, and the node (if it lives after all) registers
        again under a new lease. False when the record is under another lease by now."""
        if self._leases.get(node_id) != lease_id:
            return False
        await self._client.revoke_lease(lease_id)
        return True

    async def wait_for(self, predicate: Callable[[dict[str, bytes]], bool], timeout: float) -> dict[str, bytes]:
        """Wait until `predicate(nodes())` holds; return that view. Raises TimeoutError."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self.nodes())), timeout)
            return self.nodes()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._owned:
            await self._client.close()

    async def _follow(self) -> None:
        while True:
            try:
                await self._watch_once()
            except ETCD_ERRORS as err:
                self.connected = False
                logger.warning("watch %s broke (%s); resyncing", self.kind, err)
            await asyncio.sleep(RETRY_DELAY_S)
            try:
                await self._resync()
            except ETCD_ERRORS as err:
                self.connected = False
                logger.warning("resync %s failed: %s", self.kind, err)

    async def _watch_once(self) -> None:
        self._watch = await self._client.watch_prefix(self._prefix, start_revision=self.revision + 1)
        self.connected = True  # etcd answered the watch's creation
        try:
            async for event in self._watch:
                node_id = event.kv.key[len(self._prefix):].decode()
                value = event.kv.value if event.kind == aetcd.EventKind.PUT else None
                self.revision = max(self.revision, event.kv.mod_revision)
                await self._apply({node_id: value}, {node_id: event.kv.lease} if value is not None else {})
        finally:
            watch, self._watch = self._watch, None
            try:
                await watch.cancel()
            except ETCD_ERRORS as err:
                logger.debug("watch %s cancel: %s", self.kind, err)

    async def _resync(self) -> None:
        result = await self._client.get_prefix(self._prefix)
        fresh = {kv.key[len(self._prefix):].decode(): kv for kv in result}
        changes: dict[str, bytes | None] = {k: kv.value for k, kv in fresh.items() if self._nodes.get(k) != kv.value}
        changes.update({k: None for k in self._nodes if k not in fresh})
        self.revision = result.header.revision
        self.resyncs += 1
        self.connected = True
        await self._apply(changes, {k: kv.lease for k, kv in fresh.items()})

    async def _apply(self, changes: dict[str, bytes | None], leases: dict[str, int]) -> None:
        self._leases.update(leases)
        for node_id, value in changes.items():
            if value is None:
                self._nodes.pop(node_id, None)
                self._leases.pop(node_id, None)
            else:
                self._nodes[node_id] = value
        async with self._changed:
            self._changed.notify_all()
        if self._on_change is None:
            return
        for node_id, value in changes.items():
            result = self._on_change(node_id, value)
            if inspect.isawaitable(result):
                await result


@dataclasses.dataclass(frozen=True)
class Placement:
    """Owner of a run and the etcd revision that last wrote it (for fencing)."""

    node_id: str
    mod_revision: int


class PlacementTable:
    """Run -> node placement and run metadata, written only by revision-checked transactions."""

    def __init__(self, client: aetcd.Client) -> None:
        self._client = client
        self._txn = client.transactions

    async def place_run(self, run_id: str, node_id: str) -> bool:
        """Place `run_id` on `node_id` if it is unplaced. True if placed there now or before."""
        key = placement_key(run_id)
        succeeded, responses = await self._client.transaction(
            compare=[self._txn.version(key) == 0],
            success=[self._txn.put(key, node_id.encode())],
            failure=[self._txn.get(key)],
        )
        if succeeded:
            return True
        return bool(responses and responses[0]) and responses[0][0][0].decode() == node_id

    async def get_placement(self, run_id: str) -> Placement | None:
        result = await self._client.get(placement_key(run_id))
        if result is None:
            return None
        return Placement(result.value.decode(), result.mod_revision)

    async def move_run(
        self, run_id: str, expected_node: str, new_node: str, expected_revision: int | None = None
    ) -> bool:
        """Move the run if it is still on `expected_node` (and, if given, unchanged since
        `expected_revision`). False when someone else moved or removed it first."""
        key = placement_key(run_id)
        compare = [self._txn.value(key) == expected_node.encode()]
        if expected_revision is not None:
            compare.append(self._txn.mod(key) == expected_revision)
        succeeded, _ = await self._client.transaction(
            compare=compare, success=[self._txn.put(key, new_node.encode())], failure=[]
        )
        return succeeded

    async def release_run(self, run_id: str, expected_node: str) -> bool:
        """Remove the placement if it is still on `expected_node`."""
        key = placement_key(run_id)
        succeeded, _ = await self._client.transaction(
            compare=[self._txn.value(key) == expected_node.encode()],
            success=[self._txn.delete(key)],
            failure=[],
        )
        return succeeded

    async def list_placements(self) -> dict[str, str]:
        prefix = placement_prefix()
        result = await self._client.get_prefix(prefix)
        return {kv.key[len(prefix):].decode(): kv.value.decode() for kv in result}

    async def put_run_metadata(self, run_id: str, value: bytes) -> None:
        await self._client.put(run_key(run_id), value)

    async def get_run_metadata(self, run_id: str) -> bytes | None:
        result = await self._client.get(run_key(run_id))
        return None if result is None else result.value
