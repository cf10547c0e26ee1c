"""`GatewayStore` in the mesh's etcd (`EtcdStore`): the tables outlive a gateway restart
and are shared by gateway replicas.

    /tunemesh/gateway/models/{model_id}                    run name (utf-8)
    /tunemesh/gateway/runs/{run_id}                        model id
    /tunemesh/gateway/samplers/{sampler_id}                SamplerEntry (JSON)
    /tunemesh/gateway/sampler_seqs/{session_id}/{seq_id}   sampler id, created once

A client counter's sampling session is claimed by a transaction (`version == 0 -> put`),
so two replicas answering retries of one call agree on one session. Values are written
only after the scheduler accepted the call they record (it checked the caller owns the
session), so a key name never comes from a request the mesh refused. An etcd failure is
UNAVAILABLE (503: the SDK retries).

A model id names one run for good (the first write wins: a later one for the same id
returns the run it already names), and a sampler entry never changes once written, so
what was read or written is kept in a bounded cache (CACHED entries each): every
forward_backward, optim_step and asample looks one of them up, and an etcd read per call
was about a millisecond of each (the bench in bench/README.md, `tinker_sdk.py`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Iterable

import aetcd

from tunemesh.errors import UnavailableError
from tunemesh_common.membership import registry

from tunemesh_gateway.core.ports import SamplerEntry

PREFIX = f"{registry.ROOT}/gateway/"
CACHED = 4096  # model ids, and sampler entries, kept in memory (least recently used go first)


def _key(*parts: str | int) -> bytes:
    return (PREFIX + "/".join(str(p) for p in parts)).encode()


class EtcdStore:
    """`GatewayStore` on one aetcd client (of the serving event loop)."""

    def __init__(self, client: aetcd.Client) -> None:
        self._client = client
        self._txn = client.transactions
        self._runs = _Lru()  # model id -> run
        self._samplers = _Lru()  # sampler id -> SamplerEntry

    async def put_model(self, model_id: str, run: str) -> str:
        key = _key("models", model_id)
        written, responses = await self._do(self._client.transaction(
            compare=[self._txn.version(key) == 0],
            success=[self._txn.put(key, run.encode()),
                     self._txn.put(_key("runs", run.removeprefix("runs/")), model_id.encode())],
            failure=[self._txn.get(key)]))
        held = run if written else responses[0][0][0].decode()
        self._runs.put(model_id, held)
        return held

    async def run_of(self, model_id: str) -> str | None:
        if (run := self._runs.get(model_id)) is not None:
            return run
        run = await self._text(_key("models", model_id))
        if run is not None:
            self._runs.put(model_id, run)
        return run

    async def models_of(self, runs: Iterable[str]) -> dict[str, str]:
        found = {}
        for run in runs:  # point reads: a tenant's runs are few, the table is everyone's
            model = await self._text(_key("runs", run.removeprefix("runs/")))
            if model is not None:
                found[run] = model
        return found

    async def put_sampler(self, entry: SamplerEntry, session_id: str = "", seq_id: int = -1) -> SamplerEntry:
        value = json.dumps(dataclasses.asdict(entry)).encode()
        if not session_id or seq_id < 0:
            await self._do(self._client.put(_key("samplers", entry.sampler_id), value))
            self._samplers.put(entry.sampler_id, entry)
            return entry
        seq_key = _key("sampler_seqs", session_id, seq_id)
        claimed, responses = await self._do(self._client.transaction(
            compare=[self._txn.version(seq_key) == 0],
            success=[self._txn.put(seq_key, entry.sampler_id.encode()),
                     self._txn.put(_key("samplers", entry.sampler_id), value)],
            failure=[self._txn.get(seq_key)]))
        if claimed:
            self._samplers.put(entry.sampler_id, entry)
            return entry
        held = responses[0][0][0].decode()
        return await self.sampler(held) or entry

    async def sampler(self, sampler_id: str) -> SamplerEntry | None:
        if (entry := self._samplers.get(sampler_id)) is not None:
            return entry
        raw = await self._text(_key("samplers", sampler_id))
        if raw is None:
            return None
        entry = SamplerEntry(**json.loads(raw))
        self._samplers.put(sampler_id, entry)
        return entry

    async def sampler_for_seq(self, session_id: str, seq_id: int) -> SamplerEntry | None:
        held = await self._text(_key("sampler_seqs", session_id, seq_id))
        return await self.sampler(held) if held is not None else None

    async def _text(self, key: bytes) -> str | None:
        found = await self._do(self._client.get(key))
        return None if found is None else found.value.decode()

    @staticmethod
    async def _do(call):
        try:
            return await call
        except registry.ETCD_ERRORS as err:
            raise UnavailableError("GATEWAY_STORE_UNAVAILABLE", f"etcd: {registry.short_error(err)}") from err


class _Lru:
    """At most CACHED entries; a hit makes its entry the most recent."""

    def __init__(self) -> None:
        self._entries: collections.OrderedDict = collections.OrderedDict()

    def get(self, key):
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        if len(self._entries) > CACHED:
            self._entries.popitem(last=False)
