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
    api_keys_file: pathlib.Path | None = Field(
        None, description="keys file of hashed API keys (`tunemesh keys create --file`); re-read when it changes")
    api_keys: SecretStr = Field(
        SecretStr(""), description='development only, with --insecure-dev-keys: plain-text keys "key1=tenant1,..."')
    insecure_dev_keys: bool = Field(
        False, description="accept the plain-text --api-keys (development and tests; never in production)")
    api_keys_check_s: float = Field(2.0, gt=0, description="how often the keys file is checked for changes, in s")
    auth_max_failures: int = Field(
        10, ge=1, description="failed API key attempts from one address within auth_window_s before it is blocked")
    auth_window_s: float = Field(60.0, gt=0, description="window of auth_max_failures, in seconds")
    auth_block_s: float = Field(60.0, gt=0, description="how long an address over auth_max_failures is refused")
    ready_file: pathlib.Path | None = Field(
        None, description='written on standing by and again once leading: {"address", "pid", "role", "metrics_url"}')
    metrics_listen: HostPortOrEmpty = Field("127.0.0.1:0",
                                description="host:port of /metrics (port 0 picks one); empty: no metrics endpoint")
    batch_token_budget: int = Field(16384, ge=1, description="most tokens in one fused batch")
    batch_wait_ms: int = Field(0, ge=0, description="extra time a ready batch waits for other tenants' work, in ms")
    merge_wait_ms: int = Field(100, ge=0, description=(
        "a free trainer's next round waits at most this long (and at most a tenth of its last round's time) "
        "for the runs of its last round whose next call has not arrived yet, in ms; 0: never"))
    fair_share_grace_ms: int = Field(100, ge=0, description=(
        "a tenant whose operation ended on a trainer this recently still counts as active there: another "
        "tenant's flood gets one fair share per batch meanwhile, in ms (0: only tenants with ready work count)"))
    max_request_bytes: int = Field(64 << 20, ge=1 << 20, description=(
        "largest request message, in bytes: gRPC refuses a larger one from its length prefix, before buffering "
        "or decoding it (RESOURCE_EXHAUSTED; the SDK reports INVALID_ARGUMENT REQUEST_TOO_LARGE)"))
    max_datums: int = Field(1024, ge=1, description="most datums per request")
    max_tokens: int = Field(262144, ge=1, description="most tokens per request")
    gap_timeout_s: int = Field(300, ge=1, description="a run waiting this long on a missing seq_id fails its queue")
    max_ops_ahead: int = Field(1024, ge=1, description="most operations a run may queue beyond its last finished one")
    finished_ttl_s: int = Field(3600, ge=1, description="finished operations are kept this long, then forgotten")
    max_queued_ops_per_tenant: int = Field(
        4096, ge=0, description="most operations a tenant may have queued for trainers; more: TENANT_QUEUE_FULL (0: no cap)")
    max_queued_tokens_per_tenant: int = Field(
        4 << 20, ge=0, description="most tokens a tenant may have queued for trainers; more: TENANT_QUEUE_FULL (0: no cap)")
    max_runs_per_tenant: int = Field(16, ge=1, description=(
        "runs a tenant may hold, creates in flight included, so none takes every adapter slot; "
        "past it CreateTrainingRun fails RESOURCE_EXHAUSTED [TENANT_RUN_QUOTA]"))
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
    snapshot_replay_budget_s: float = Field(4.0, ge=0, description=(
        "... or before the trainer rounds of its work since the last one pass this many seconds "
        "(what a move replays after a trainer dies); 0: never by work"))
    restore_hold_s: float = Field(5.0, ge=0, description=(
        "a trainer receiving moved runs gets no new round while it rebuilds them, for up to this long "
        "after the latest rebuild began or the round it waited for ended"))
    recover_alone: bool = Field(True, description=(
        "a run moved while its client waited goes out in a round of its own, the one fewest calls from "
        "its answer first: on a CPU the moved runs answer one after another, not all after one long round"))
    journal_linger_ms: float = Field(20.0, ge=0, description=(
        "a change nobody waits on yet waits at most this long to share an etcd write; one waited on goes at once"))
    journal_defer_ms: float = Field(50.0, ge=0, description="an operation's finish or eviction waits at most this "
                                    "long to share the next etcd write (0: written like any change)")
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
    """The inline (plain-text, development) API key -> tenant map."""
    keys: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in s.api_keys.get_secret_value().split(","))):
        key, _, tenant = pair.partition("=")
        keys[key] = tenant
    return keys
