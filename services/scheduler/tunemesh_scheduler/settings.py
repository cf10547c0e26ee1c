"""Scheduler settings: flags, else `TUNEMESH_SCHEDULER_*` environment variables, else defaults."""

from __future__ import annotations

import dataclasses
import pathlib

from tunemesh_common import settings


@dataclasses.dataclass(frozen=True)
class SchedulerSettings:
    listen: str = "127.0.0.1:0"  # host:port; port 0 picks a free one
    etcd: str = "127.0.0.1:2379"  # host:port of etcd
    api_keys_file: pathlib.Path | None = None  # JSON {"api key": "tenant", ...}
    api_keys: str = ""  # or inline "key1=tenant1,key2=tenant2"
    ready_file: pathlib.Path | None = None  # written once serving: {"address", "pid", "metrics_url"}
    metrics_listen: str = "127.0.0.1:0"  # host:port of /metrics (port 0 picks one); empty: none
    batch_token_budget: int = 16384  # most tokens in one fused batch
    batch_wait_ms: int = 0  # extra time a ready batch waits for other tenants' work
    max_datums: int = 1024  # most datums per request
    max_tokens: int = 262144  # most tokens per request
    gap_timeout_s: int = 300  # a run waiting this long on a missing seq_id fails its queue
    max_ops_ahead: int = 1024  # most operations a run may queue beyond its last finished one
    finished_ttl_s: int = 3600  # finished operations are kept this long, then forgotten
    max_runs_per_tenant: int = 16  # so no tenant can take every trainer's adapter slots
    wait_cap_s: int = 30  # longest WaitOperation hold
    trainer_timeout_s: int = 600  # deadline of one call to a trainer
    checkpoint: str = ""  # host:port of the checkpoint service; empty: checkpoint calls fail
    checkpoint_timeout_s: int = 600  # deadline of one call to the checkpoint service
    sampler_timeout_s: int = 600  # deadline of one call to a sampler
    max_samples: int = 16  # sequences per Sample request
    durable: bool = True  # journal sessions, runs and op logs to etcd and recover them on start
    store_timeout_s: float = 5.0  # a create waits this long for etcd, then answers UNAVAILABLE
    snapshot_every_steps: int = 8  # snapshot each run (weights + AdamW) after this many optim steps; 0: never
    snapshot_every_s: float = 300.0  # ... or this long after its last snapshot; 0: never
    snapshot_min_interval_s: float = 2.0  # ... but never sooner than this after the last one
    journal_linger_ms: float = 2.0  # the op log gathers changes this long before each etcd write
    leader_ttl_s: int = 5  # lease of the leadership: a standby takes over this long after the leader dies
    session_timeout_s: float = 600.0  # a session without heartbeat this long ends; its idle runs freeze; 0: never


def load(argv: list[str] | None = None) -> SchedulerSettings:
    return settings.load(SchedulerSettings, "TUNEMESH_SCHEDULER_", argv)


def api_keys(s: SchedulerSettings) -> dict[str, str]:
    """The configured API key -> tenant map (file first, then the inline list)."""
    import json

    keys: dict[str, str] = {}
    if s.api_keys_file is not None:
        keys.update(json.loads(s.api_keys_file.read_text()))
    for pair in filter(None, (p.strip() for p in s.api_keys.split(","))):
        key, _, tenant = pair.partition("=")
        if not tenant:
            raise ValueError(f"api_keys entry {pair!r} is not key=tenant")
        keys[key] = tenant
    return keys
