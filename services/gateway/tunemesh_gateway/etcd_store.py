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
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable

import aetcd

from tunemesh.errors import UnavailableError
from tunemesh_common.membership import registry

from tunemesh_gateway.core.ports import SamplerEntry

PREFIX = f"{registry.ROOT}/gateway/"


def _key(*parts: str | int) -> bytes:
    return (PREFIX + "/".join(str(p) for p in parts)).encode()


class EtcdStore:
    """`GatewayStore` on one aetcd client (of the serving event loop)."""

    def __init__(self, client: aetcd.Client) -> None:
        self._client = client
        self._txn = client.transactions

    async def put_model(self, model_id: str, run: str) -> None:
        await self._do(self._client.transaction(compare=[], failure=[], success=[
            self._txn.put(_key("models", model_id), run.encode()),
            self._txn.put(_key("runs", run.removeprefix("runs/")), model_id.encode())]))

    async def run_of(self, model_id: str) -> str | None:
        return await self._text(_key("models", model_id))

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
            return entry
        seq_key = _key("sampler_seqs", session_id, seq_id)
        claimed, responses = await self._do(self._client.transaction(
            compare=[self._txn.version(seq_key) == 0],
            success=[self._txn.put(seq_key, entry.sampler_id.encode()),
                     self._txn.put(_key("samplers", entry.sampler_id), value)],
            failure=[self._txn.get(seq_key)]))
        if claimed:
            return entry
        held = responses[0][0][0].decode()
        return await self.sampler(held) or entry

    async def sampler(self, sampler_id: str) -> SamplerEntry | None:
        raw = await self._text(_key("samplers", sampler_id))
        return SamplerEntry(**json.loads(raw)) if raw is not None else None

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
