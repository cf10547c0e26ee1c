"""Scheduler settings: flags, else `TUNEMESH_SCHEDULER_*` environment variables, else defaults."""

from __future__ import annotations

import pathlib

from pydantic import Field, SecretStr, field_validator

from tunemesh_common.service import settings
from tunemesh_common.service.settings import HostPort, HostPortOrEmpty


class SchedulerSettings(settings.ServiceSettings):
    """The public front door of the mesh (`python -m tunemesh_scheduler`)."""

    model_config = settings.settings_config("scheduler")

    listen: HostPort = Field("127.0.0.1:0", description="host:port to serve on; port 0 picks a free one")
    etcd: HostPort = Field("127.0.0.1:2379", description="host:port of etcd")
    api_keys_file: pathlib.Path | None = Field(None, description='JSON {"api key": "tenant", ...}')
    api_keys: SecretStr = Field(
        SecretStr(""), description='API keys inline: "key1=tenant1,key2=tenant2" (added to the file\'s)')
    ready_file: pathlib.Path | None = Field(
        None, description='written on standing by and again once leading: {"address", "pid", "role", "metrics_url"}')
    metrics_listen: HostPortOrEmpty = Field("127.0.0.1:0",
                                description="host:port of /metrics (port 0 picks one); empty: no metrics endpoint")
    batch_token_budget: int = Field(16384, ge=1, description="most tokens in one fused batch")
    batch_wait_ms: int = Field(0, ge=0, description="extra time a ready batch waits for other tenants' work, in ms")
    max_datums: int = Field(1024, ge=1, description="most datums per request")
    max_tokens: int = Field(262144, ge=1, description="most tokens per request")
    gap_timeout_s: int = Field(300, ge=1, description="a run waiting this long on a missing seq_id fails its queue")
    max_ops_ahead: int = Field(1024, ge=1, description="most operations a run may queue beyond its last finished one")
    finished_ttl_s: int = Field(3600, ge=1, description="finished operations are kept this long, then forgotten")
    max_runs_per_tenant: int = Field(16, ge=1, description="runs a tenant may hold, so none takes every adapter slot")
    wait_cap_s: int = Field(30, ge=1, description="longest WaitOperation hold, in seconds")
    trainer_timeout_s: int = Field(600, ge=1, description="deadline of one call to a trainer, in seconds")
    checkpoint: HostPortOrEmpty = Field("",
                            description="host:port of the checkpoint service; empty: checkpoint calls fail")
    checkpoint_timeout_s: int = Field(600, ge=1, description="deadline of one call to the checkpoint service, in seconds")
    sampler_timeout_s: int = Field(600, ge=1, description="deadline of one call to a sampler, in seconds")
    max_samples: int = Field(16, ge=1, description="sequences per Sample request")
    durable: bool = Field(True, description="journal sessions, runs and op logs to etcd and recover them on start")
    store_timeout_s: float = Field(5.0, gt=0, description="a create waits this long for etcd, then answers UNAVAILABLE")
    snapshot_every_steps: int = Field(
        8, ge=0, description="snapshot each run (weights + AdamW) after this many optim steps; 0: never")
    snapshot_every_s: float = Field(300.0, ge=0, description="... or this long after its last snapshot; 0: never")
    snapshot_min_interval_s: float = Field(2.0, ge=0, description="... but never sooner than this after the last one")
    journal_linger_ms: float = Field(2.0, ge=0, description="the op log gathers changes this long before each etcd write")
    leader_ttl_s: int = Field(
        5, ge=1, description="lease of the leadership: a standby takes over this long after the leader dies")
    session_timeout_s: float = Field(
        600.0, ge=0, description="a session without heartbeat this long ends and its idle runs freeze; 0: never")

    @field_validator("api_keys")
    @classmethod
    def _pairs(cls, value: SecretStr) -> SecretStr:
        for pair in filter(None, (p.strip() for p in value.get_secret_value().split(","))):
            if not pair.partition("=")[2]:
                raise ValueError(f"entry {pair.partition('=')[0]!r} is not key=tenant")
        return value


def load(argv: list[str] | None = None) -> SchedulerSettings:
    return settings.load(SchedulerSettings, argv)


def api_keys(s: SchedulerSettings) -> dict[str, str]:
    """The configured API key -> tenant map (file first, then the inline list)."""
    import json

    keys: dict[str, str] = {}
    if s.api_keys_file is not None:
        keys.update(json.loads(s.api_keys_file.read_text()))
    for pair in filter(None, (p.strip() for p in s.api_keys.get_secret_value().split(","))):
        key, _, tenant = pair.partition("=")
        if not tenant:
            raise ValueError(f"api_keys entry {pair!r} is not key=tenant")
        keys[key] = tenant
    return keys
