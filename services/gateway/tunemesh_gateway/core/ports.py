"""What core works on: the caller, the scheduler (`Upstream`) and the gateway's own tables
(`GatewayStore`). The gRPC and storage implementations live outside core
(`tunemesh_gateway.upstream`, `tunemesh_gateway.store`); tests give fakes."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from typing import Any, Protocol


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who is calling: the API key the scheduler authenticates (sent on as `authorization:
    Bearer <key>`). The gateway never learns the tenant; what it keeps itself (sample
    results, sampler entries) it hands back only to the same key (`owner`)."""

    api_key: str = dataclasses.field(repr=False)

    @property
    def owner(self) -> str:
        return hashlib.sha256(self.api_key.encode()).hexdigest()[:24]


class Upstream(Protocol):
    """The scheduler's public API: the tunemesh.v1 stubs and one way to call them."""

    sessions: Any  # SessionServiceStub
    training: Any  # TrainingServiceStub
    operations: Any  # OperationServiceStub
    checkpoints: Any  # CheckpointServiceStub
    sampling: Any  # SamplingServiceStub

    async def call(self, caller: Caller, method: Any, request: Any, timeout: float | None = None) -> Any:
        """`method(request)` as `caller`; raises the typed TunemeshError of a failed call."""
        ...


@dataclasses.dataclass(frozen=True)
class SamplerEntry:
    """A sampling session the gateway created: what `GET /samplers/{id}` answers."""

    sampler_id: str  # the Tinker sampling_session_id: the id of `sampling_sessions/{id}`
    base_model: str
    model_path: str  # the tinker:// path it samples, '' for the base model
    owner: str  # Caller.owner of the key that created it


class GatewayStore(Protocol):
    """The gateway's tables. Implementations: `store.MemoryStore` (one process, lost on
    restart); the scheduler owns everything else."""

    async def put_model(self, model_id: str, run: str) -> str:
        """Remember that Tinker model `model_id` is tunemesh run `run` (`runs/{id}`), unless
        the id already names a run: returns the run it names (the first write wins)."""
        ...

    async def run_of(self, model_id: str) -> str | None:
        ...

    async def models_of(self, runs: Iterable[str]) -> dict[str, str]:
        """{run: model_id} for the runs that have one."""
        ...

    async def put_sampler(self, entry: SamplerEntry, session_id: str = "", seq_id: int = -1) -> SamplerEntry:
        """Keep `entry`; with (session_id, seq_id), only if that client counter has no entry
        yet: returns the entry that holds it (the earlier one when there was one)."""
        ...

    async def sampler(self, sampler_id: str) -> SamplerEntry | None:
        ...

    async def sampler_for_seq(self, session_id: str, seq_id: int) -> SamplerEntry | None:
        ...
