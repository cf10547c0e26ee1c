"""The gateway's logic: Tinker calls translated into tunemesh.v1 calls, on plain values.
Imports neither grpc nor the web framework: `app` decodes HTTP, `upstream` makes the calls."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from tunemesh_gateway.core.catalog import CatalogCore
from tunemesh_gateway.core.futures import LocalFutures
from tunemesh_gateway.core.names import Names
from tunemesh_gateway.core.ports import Caller, GatewayStore, SamplerEntry, Upstream
from tunemesh_gateway.core.retrieve import FutureCore
from tunemesh_gateway.core.sampling import SamplingConfig, SamplingCore
from tunemesh_gateway.core.sessions import SessionCore
from tunemesh_gateway.core.training import TrainingConfig, TrainingCore

__all__ = ["Caller", "CoreConfig", "GatewayCore", "GatewayStore", "SamplerEntry", "Upstream"]


@dataclasses.dataclass(frozen=True)
class CoreConfig:
    """The settings core uses (`GatewaySettings` has each, documented)."""

    call_timeout_s: float = 30.0
    create_timeout_s: float = 900.0
    sample_timeout_s: float = 900.0
    poll_wait_s: float = 25.0
    max_samples_per_call: int = 16
    max_inflight_samples: int = 512
    result_ttl_s: float = 600.0
    unnamed_sampler_ttl_s: int = 86400
    fwdbwd_max_chunk_bytes: int = 4_000_000


class GatewayCore:
    """One part per group of endpoints, sharing the upstream, the tables and the futures."""

    def __init__(self, upstream: Upstream, store: GatewayStore, config: CoreConfig = CoreConfig(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        names = Names(store, upstream, config.call_timeout_s)
        self.local_futures = LocalFutures(clock, config.result_ttl_s)
        self.sessions = SessionCore(upstream, config.fwdbwd_max_chunk_bytes, config.call_timeout_s)
        self.sampling = SamplingCore(upstream, store, names, self.local_futures, SamplingConfig(
            config.call_timeout_s, config.sample_timeout_s, config.max_samples_per_call, config.max_inflight_samples))
        self.training = TrainingCore(upstream, store, names, self.local_futures, TrainingConfig(
            config.call_timeout_s, config.create_timeout_s, config.unnamed_sampler_ttl_s))
        self.futures = FutureCore(upstream, names, self.local_futures, self.sampling, config.poll_wait_s,
                                  self.training.fill_lost)
        self.catalog = CatalogCore(upstream, names, config.call_timeout_s)

    async def close(self) -> None:
        """Cancel background work still running."""
        await self.local_futures.close()
