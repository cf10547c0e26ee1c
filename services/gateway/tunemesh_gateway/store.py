"""The gateway's tables in memory (`MemoryStore`): one gateway process, lost on restart
(`etcd_store.EtcdStore` keeps them in the mesh's etcd instead).

What a restart of an in-memory gateway loses, and what then happens: a model id is
found again by its run's `tinker.model_id` label (one ListTrainingRuns); a sampler entry
is gone (`GET /samplers/{id}` answers 404; sampling goes on, the scheduler holds the
session), and so is the (session, sampling_session_seq_id) dedup of sampling sessions.
Running samples and creates are local futures: 410, and the SDK submits them again.
"""

from __future__ import annotations

from collections.abc import Iterable

from tunemesh_gateway.core.ports import SamplerEntry


class MemoryStore:
    """`GatewayStore` in dicts (the event loop's only: no locks)."""

    def __init__(self) -> None:
        self._runs: dict[str, str] = {}  # model id -> run
        self._models: dict[str, str] = {}  # run -> model id
        self._samplers: dict[str, SamplerEntry] = {}
        self._by_seq: dict[tuple[str, int], str] = {}  # (session id, sampling_session_seq_id) -> sampler id

    async def put_model(self, model_id: str, run: str) -> str:
        held = self._runs.setdefault(model_id, run)
        if held == run:
            self._models[run] = model_id
        return held

    async def run_of(self, model_id: str) -> str | None:
        return self._runs.get(model_id)

    async def models_of(self, runs: Iterable[str]) -> dict[str, str]:
        return {run: self._models[run] for run in runs if run in self._models}

    async def put_sampler(self, entry: SamplerEntry, session_id: str = "", seq_id: int = -1) -> SamplerEntry:
        if session_id and seq_id >= 0:
            held = self._by_seq.setdefault((session_id, seq_id), entry.sampler_id)
            if held != entry.sampler_id:
                return self._samplers[held]
        self._samplers[entry.sampler_id] = entry
        return entry

    async def sampler(self, sampler_id: str) -> SamplerEntry | None:
        return self._samplers.get(sampler_id)

    async def sampler_for_seq(self, session_id: str, seq_id: int) -> SamplerEntry | None:
        held = self._by_seq.get((session_id, seq_id))
        return self._samplers.get(held) if held is not None else None
