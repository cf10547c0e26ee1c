"""Tinker futures: what a `request_id` names, and the work the gateway runs itself.

A request id is a `FutureRef` in text. For queued training work it names the scheduler's
Operation (plus the model id its paths need): stateless, so it survives a gateway
restart. CreateTrainingRun and Sample are calls the scheduler answers only when done, so
the gateway runs them in the background (`LocalFutures`); their request ids are
deterministic in the SDK's own idempotency key, so a retried submit finds the running
work, and after a restart the id is unknown: 410, and the SDK submits again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "tm1."
OP, CREATE, LOAD, SAMPLE = "op", "create", "load", "sample"


@dataclasses.dataclass(frozen=True)
class FutureRef:
    """`kind` op: `key` is the operation name, `model` the Tinker model id, `order` its
    seq_id in the model's order; an unnamed save_weights_for_sampler also carries the
    client's (`session`, `seq`) to make its sampling session once. create, load (create-via-load): `key` is the model id. sample: `key` is
    `{owner}/{sampling_session_id}/{seq_id}`."""

    kind: str
    key: str
    model: str = ""
    session: str = ""
    seq: int = -1
    order: int = -1

    def encode(self) -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if v not in ("", -1)}
        text = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()
        return PREFIX + base64.urlsafe_b64encode(text).decode().rstrip("=")

    @classmethod
    def decode(cls, request_id: str) -> FutureRef:
        """ValueError for text no gateway made."""
        if not isinstance(request_id, str) or not request_id.startswith(PREFIX) or len(request_id) > 4096:
            raise ValueError("not a gateway request id")
        raw = request_id[len(PREFIX):]
        try:
            fields = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
            ref = cls(**fields)
        except (binascii.Error, ValueError, TypeError) as err:
            raise ValueError("not a gateway request id") from err
        if (ref.kind not in (OP, CREATE, LOAD, SAMPLE) or not isinstance(ref.key, str)
                or not isinstance(ref.seq, int) or not isinstance(ref.order, int)):
            raise ValueError("not a gateway request id")
        return ref


class Unknown(KeyError):
    """No such local future (never made, expired, or made before a restart)."""


@dataclasses.dataclass
class _Entry:
    owner: str
    kind: str
    task: asyncio.Task
    done_at: float | None = None


class LocalFutures:
    """Background calls by (owner, request id): each key sees and starts only its own, so
    a request id another key already uses (guessed or not) neither blocks nor reaches
    that key's work. A finished one is kept `ttl_s` (the SDK fetches it once; HTTP
    retries may repeat)."""

    def __init__(self, clock: Callable[[], float], ttl_s: float) -> None:
        self._clock, self._ttl_s = clock, ttl_s
        self._entries: dict[tuple[str, str], _Entry] = {}

    def has(self, request_id: str, owner: str) -> bool:
        return (owner, request_id) in self._entries

    def running(self, kind: str) -> int:
        return sum(1 for e in self._entries.values() if e.kind == kind and not e.task.done())

    def start(self, request_id: str, owner: str, kind: str, work: Callable[[], Awaitable[Any]]) -> bool:
        """Run `work()` under `owner`'s `request_id` unless it already runs or has finished
        there; True if it started now."""
        self._sweep()
        if (owner, request_id) in self._entries:
            return False
        entry = _Entry(owner, kind, asyncio.ensure_future(work()))
        entry.task.add_done_callback(lambda _: self._finished(entry))
        self._entries[(owner, request_id)] = entry
        return True

    def _finished(self, entry: _Entry) -> None:
        entry.done_at = self._clock()
        if not entry.task.cancelled() and entry.task.exception() is not None:
            log.debug("background %s failed: %r", entry.kind, entry.task.exception())

    async def wait(self, request_id: str, owner: str, timeout_s: float) -> tuple[bool, Any]:
        """(True, result) once done, (False, None) if still running after `timeout_s`;
        raises the work's exception, or Unknown (also for another key's future)."""
        entry = self._entries.get((owner, request_id))
        if entry is None:
            raise Unknown(request_id)
        done, _ = await asyncio.wait({entry.task}, timeout=timeout_s)
        if not done:
            return False, None
        return True, entry.task.result()

    def forget(self, request_id: str, owner: str) -> None:
        """Drop a future (its work failed in a way the SDK should submit again)."""
        self._entries.pop((owner, request_id), None)

    def _sweep(self) -> None:
        horizon = self._clock() - self._ttl_s
        for key in [k for k, e in self._entries.items() if e.done_at is not None and e.done_at < horizon]:
            del self._entries[key]

    async def close(self) -> None:
        tasks = [e.task for e in self._entries.values() if not e.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
