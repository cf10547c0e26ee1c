"""Checkpoint paths and names: the only way a user string becomes a storage location.

    tunemesh://runs/{run_id}/state/{name}     weights + optimizer state (save_state)
    tunemesh://runs/{run_id}/sampler/{name}   weights only (save_weights_for_sampler)
    tunemesh://imports/{name}                 an imported PEFT adapter

A path never names its tenant: the caller's tenant is prefixed in `storage_key`, so one
tenant's path can only ever reach that tenant's checkpoints. Every segment must match
SEGMENT_RE, which excludes `/`, `%`, NUL, whitespace and a leading `.`; `..` anywhere is
refused as well, so no spelling (percent-encoded or not) can leave the tenant's prefix.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import re

from tunemesh.errors import InvalidArgumentError

SCHEME = "tunemesh://"
SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_PATH_CHARS = 512
AUTO_PREFIX = "auto-"  # names the service picks for unnamed sampler saves
SNAPSHOT_PREFIX = "snapshot-"  # automatic snapshots of runs (internal: not listed, collected)
MAX_TTL_S = 10 * 365 * 24 * 3600
MAX_USER_METADATA = 64  # entries
MAX_USER_METADATA_CHARS = 4096  # per key or value


class CheckpointKind(enum.StrEnum):
    """What a checkpoint holds; the value is its path segment."""

    STATE = "state"
    SAMPLER = "sampler"
    IMPORTED = "imports"


def is_segment(text: str) -> bool:
    """Whether `text` is a safe single path segment."""
    return SEGMENT_RE.fullmatch(text) is not None and ".." not in text


def check_name(name: str, *, user: bool = True) -> str:
    """A checkpoint name, or InvalidArgumentError(BAD_CHECKPOINT_NAME) with the rule."""
    if not is_segment(name):
        raise InvalidArgumentError(
            "BAD_CHECKPOINT_NAME",
            f"checkpoint name {name[:140]!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'",
        )
    if user and name.startswith(AUTO_PREFIX):
        raise InvalidArgumentError(
            "BAD_CHECKPOINT_NAME", f"names starting with {AUTO_PREFIX!r} are reserved for unnamed saves"
        )
    if user and name.startswith(SNAPSHOT_PREFIX):
        raise InvalidArgumentError(
            "BAD_CHECKPOINT_NAME", f"names starting with {SNAPSHOT_PREFIX!r} are reserved for automatic snapshots"
        )
    return name


def check_ttl(ttl_seconds: int) -> int:
    """A TTL in seconds (0: never expires) or InvalidArgumentError(BAD_TTL)."""
    if not 0 <= ttl_seconds <= MAX_TTL_S:
        raise InvalidArgumentError("BAD_TTL", f"ttl_seconds must lie in [0, {MAX_TTL_S}] (0: never expires)")
    return ttl_seconds


def check_user_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Labels kept with a checkpoint, bounded in count and size."""
    if len(metadata) > MAX_USER_METADATA or any(
        len(k) > MAX_USER_METADATA_CHARS or len(v) > MAX_USER_METADATA_CHARS for k, v in metadata.items()
    ):
        raise InvalidArgumentError(
            "BAD_USER_METADATA",
            f"user_metadata allows {MAX_USER_METADATA} entries of at most {MAX_USER_METADATA_CHARS} characters",
        )
    return metadata


def auto_name(seq_id: int) -> str:
    """The name of an unnamed save: unique per run because seq_ids are."""
    return f"{AUTO_PREFIX}{seq_id:06d}"


def is_snapshot(key: str) -> bool:
    """Whether a storage key (or path) names an automatic snapshot."""
    return f"/{CheckpointKind.STATE}/{SNAPSHOT_PREFIX}" in key


def run_id(run: str) -> str:
    """`runs/{id}` -> id, checked to be a safe segment."""
    prefix, _, ident = run.partition("/")
    if prefix != "runs" or not is_segment(ident):
        raise InvalidArgumentError("BAD_RUN_NAME", f"run name {run[:140]!r} is not runs/{{id}}")
    return ident


def tenant_segment(tenant: str) -> str:
    """The storage segment of a tenant: the tenant itself when safe, else a digest."""
    if is_segment(tenant) and not tenant.startswith("h-"):
        return tenant
    return "h-" + hashlib.sha256(tenant.encode()).hexdigest()[:40]


@dataclasses.dataclass(frozen=True)
class CheckpointPath:
    """A parsed checkpoint path."""

    kind: CheckpointKind
    name: str
    run_id: str = ""  # empty for imports

    @classmethod
    def for_run(cls, run: str, kind: CheckpointKind, name: str) -> CheckpointPath:
        return cls(kind, check_name(name, user=False), run_id(run))

    @classmethod
    def imported(cls, name: str) -> CheckpointPath:
        return cls(CheckpointKind.IMPORTED, check_name(name))

    @classmethod
    def parse(cls, path: str) -> CheckpointPath:
        """Parse a `tunemesh://` path or raise InvalidArgumentError(BAD_CHECKPOINT_PATH)."""
        if not isinstance(path, str) or len(path) > MAX_PATH_CHARS or not path.startswith(SCHEME):
            raise _bad_path(path)
        parts = path[len(SCHEME):].split("/")
        if not all(is_segment(p) for p in parts):
            raise _bad_path(path)
        if len(parts) == 2 and parts[0] == CheckpointKind.IMPORTED:
            return cls(CheckpointKind.IMPORTED, parts[1])
        if len(parts) == 4 and parts[0] == "runs" and parts[2] in (CheckpointKind.STATE, CheckpointKind.SAMPLER):
            return cls(CheckpointKind(parts[2]), parts[3], parts[1])
        raise _bad_path(path)

    @property
    def run(self) -> str:
        """The run that wrote it, `runs/{id}`, or '' for imports."""
        return f"runs/{self.run_id}" if self.run_id else ""

    def __str__(self) -> str:
        if self.kind is CheckpointKind.IMPORTED:
            return f"{SCHEME}{self.kind}/{self.name}"
        return f"{SCHEME}runs/{self.run_id}/{self.kind}/{self.name}"

    def storage_key(self, tenant: str) -> str:
        """Where the store keeps it: always under the tenant's own prefix."""
        if self.kind is CheckpointKind.IMPORTED:
            return f"{tenant_segment(tenant)}/{self.kind}/{self.name}"
        return f"{tenant_segment(tenant)}/runs/{self.run_id}/{self.kind}/{self.name}"


def storage_prefix(tenant: str, run: str = "") -> str:
    """The store prefix of a tenant's checkpoints, or of one of its runs."""
    if not run:
        return tenant_segment(tenant)
    return f"{tenant_segment(tenant)}/runs/{run_id(run)}"


def _bad_path(path: object) -> InvalidArgumentError:
    shown = path[:140] if isinstance(path, str) else type(path).__name__
    return InvalidArgumentError(
        "BAD_CHECKPOINT_PATH",
        f"{shown!r} is not a checkpoint path: expected tunemesh://runs/{{run}}/state/{{name}}, "
        "tunemesh://runs/{run}/sampler/{name} or tunemesh://imports/{name}",
    )


def adapter_key(tenant: str, path: str) -> str:
    """The name samplers give the weights of a tenant's checkpoint: one key per immutable
    checkpoint, revealing neither tenant nor path (it is published in etcd)."""
    return "a" + hashlib.sha256(f"{tenant}\0{path}".encode()).hexdigest()[:32]
