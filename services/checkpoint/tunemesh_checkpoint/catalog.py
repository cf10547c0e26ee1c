"""The checkpoint service's logic: tenant-scoped, immutable checkpoints over a store.

Every method takes the caller's tenant first and resolves user paths through
`CheckpointPath.storage_key(tenant)`, so another tenant's checkpoint is simply absent
(NotFoundError). Expired checkpoints read as absent at once and are deleted by `sweep`.
Every write counts against its tenant's byte quota as its bytes arrive (`quota.py`).
No grpc here: the server layer streams bytes in and out through these methods.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator

from tunemesh_checkpoint.adapter_import import AdapterImport
from tunemesh_checkpoint.quota import QuotaWriter, TenantUsage
from tunemesh_checkpoint.store import BlobInfo, CheckpointStore, CheckpointWriter, Manifest
from tunemesh_common.lora import peft_format
from tunemesh_common.checkpoints.paths import (
    CheckpointKind, CheckpointPath, check_ttl, check_user_metadata, is_snapshot, storage_prefix,
)
from tunemesh.errors import AlreadyExistsError, DataLossError, InvalidArgumentError, NotFoundError, TunemeshError

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
ALLOWED_FILES = {peft_format.CONFIG_FILE, peft_format.WEIGHTS_FILE, peft_format.OPTIMIZER_FILE}


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """What a writer declares about a new checkpoint."""

    path: CheckpointPath
    base_model: str
    lora: dict  # LoraConfig fields: rank, alpha, train_attn, train_mlp, train_unembed, train_experts, seed
    step: int = 0
    has_optimizer_state: bool = False
    ttl_seconds: int = 0
    user_metadata: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
    """A committed checkpoint as clients see it."""

    path: CheckpointPath
    base_model: str
    lora: dict
    step: int
    has_optimizer_state: bool
    user_metadata: dict[str, str]
    create_time: float
    expire_time: float | None
    files: tuple[BlobInfo, ...]

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


class CheckpointCatalog:
    """Write, read, list, expire and delete checkpoints of many tenants in one store."""

    def __init__(self, store: CheckpointStore, clock: Callable[[], float] = time.time,
                 usage: TenantUsage | None = None) -> None:
        """`usage`: the tenants' bytes and their quota, counted from `store` at start
        (`TenantUsage.counted`); by default no quota, counting from zero."""
        self._store = store
        self._clock = clock
        self.usage = usage if usage is not None else TenantUsage()

    # ---- writing ---------------------------------------------------------------------

    def open_write(self, tenant: str, spec: CheckpointSpec) -> CheckpointWriter:
        """Check `spec` and return a writer for its files; `commit` finishes it. The
        writer refuses a chunk that would pass the tenant's quota
        (ResourceExhaustedError(STORAGE_QUOTA)) before writing it."""
        _check_spec(spec)
        key = spec.path.storage_key(tenant)
        if self._find(key) is not None and not is_snapshot(key):  # a snapshot may be written again
            raise _exists(spec.path)
        self.usage.check_room(key)  # a tenant already at its quota is refused before any byte
        return QuotaWriter(self._store.writer(key), self.usage, key)

    def commit(self, writer: CheckpointWriter, spec: CheckpointSpec, written: list[BlobInfo]) -> CheckpointRecord:
        """Publish a written checkpoint once its files are the right set."""
        names = sorted(b.name for b in written)
        wanted = sorted(_required_files(spec))
        if names != wanted:
            raise InvalidArgumentError("BAD_CHECKPOINT_FILES", f"a {spec.path.kind} checkpoint needs files {wanted}, got {names}")
        expire = self._clock() + spec.ttl_seconds if spec.ttl_seconds else None
        metadata = {
            "path": str(spec.path), "base_model": spec.base_model, "lora": spec.lora, "step": spec.step,
            "has_optimizer_state": spec.has_optimizer_state, "user_metadata": spec.user_metadata,
            "expire_time": expire,
        }
        try:
            manifest = writer.commit(metadata)
        except TunemeshError as err:
            if err.reason == "CHECKPOINT_EXISTS":
                return self._written_again(writer.key, spec, written)
            raise
        log.info("checkpoint %s committed (%d bytes)", spec.path, manifest.size_bytes)
        return _record(manifest)

    def write(self, tenant: str, spec: CheckpointSpec, files: Iterable[tuple[str, Iterable[bytes]]]) -> CheckpointRecord:
        """Write and commit in one call (files as (name, chunks))."""
        with self.open_write(tenant, spec) as writer:
            written = [writer.write_blob(check_file_name(name), chunks) for name, chunks in files]
            return self.commit(writer, spec, written)

    def open_import(self, tenant: str, name: str, base_model: str, ttl_seconds: int = 0,
                    user_metadata: dict[str, str] | None = None) -> AdapterImport:
        """Start `tunemesh://imports/{name}` from a PEFT adapter directory's two files,
        streamed in through the returned import (`write_file`, then `commit`)."""
        if not base_model:
            raise InvalidArgumentError("MISSING_BASE_MODEL", "an import must name its base model")
        spec = CheckpointSpec(CheckpointPath.imported(name), base_model, {}, 0, False, ttl_seconds,
                              dict(user_metadata or {}))
        return AdapterImport(self.open_write(tenant, spec), spec, self.commit)

    def import_peft(self, tenant: str, name: str, base_model: str, files: dict[str, bytes],
                    ttl_seconds: int = 0, user_metadata: dict[str, str] | None = None) -> CheckpointRecord:
        """`open_import` with the files in hand (name -> content)."""
        with self.open_import(tenant, name, base_model, ttl_seconds, user_metadata) as adapter:
            for file_name, data in files.items():
                adapter.write_file(file_name, [data])
            return adapter.commit()

    def _written_again(self, key: str, spec: CheckpointSpec, written: list[BlobInfo]) -> CheckpointRecord:
        """`key` was taken when `written` was committed. An automatic snapshot names its run
        and step, and a run's state after a step does not depend on which trainer computed
        it (a moved run replays its calls bit for bit), so a snapshot is written again when
        its step is sent again after a move (the old trainer may have written it first):
        the same files are that snapshot. Other files there mean the replay diverged."""
        existing = self._find(key)
        if existing is None or not is_snapshot(key):
            raise _exists(spec.path)
        if _digests(existing.blobs) != _digests(written):
            log.error("snapshot %s written again with other bytes: the run's replay diverged", spec.path)
            raise DataLossError("SNAPSHOT_DIVERGED",
                                f"{spec.path} exists with other files: the run's state after that step differs")
        log.info("snapshot %s written again, with the same files", spec.path)
        return _record(existing)

    # ---- reading ---------------------------------------------------------------------

    def get(self, tenant: str, path: str) -> CheckpointRecord:
        """The tenant's checkpoint at `path`, or NotFoundError (also when expired)."""
        parsed = CheckpointPath.parse(path)
        manifest = self._find(parsed.storage_key(tenant))
        if manifest is None or self._expired(manifest):
            raise NotFoundError("CHECKPOINT_NOT_FOUND", f"checkpoint {path!r} not found")
        return _record(manifest)

    def read(self, tenant: str, path: str, chunk_size: int = 1 << 20) -> tuple[CheckpointRecord, Iterator[tuple[str, int, bytes]]]:
        """The checkpoint and its files as (file name, offset, chunk), verified by sha256."""
        record = self.get(tenant, path)
        key = record.path.storage_key(tenant)
        return record, _file_chunks(self._store, key, record.files, chunk_size)

    def list(self, tenant: str, run: str = "", page_size: int = 0, page_token: str = "") -> tuple[list[CheckpointRecord], str]:
        """One page of the tenant's live checkpoints (of one run, or all), ordered by key."""
        if page_size < 0:
            raise InvalidArgumentError("INVALID_PAGE_SIZE", "page_size must be >= 0")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_token(page_token)
        live = [m for m in self._store.list(storage_prefix(tenant, run))
                if not self._expired(m) and m.key > after and not is_snapshot(m.key)]
        page = live[:size]
        token = _encode_token(page[-1].key) if len(live) > size else ""
        return [_record(m) for m in page], token

    # ---- management ------------------------------------------------------------------

    def delete(self, tenant: str, path: str) -> None:
        record = self.get(tenant, path)
        key = record.path.storage_key(tenant)
        self._store.delete(key)
        self.usage.free(key, record.size_bytes)
        log.info("checkpoint %s deleted", path)

    def set_ttl(self, tenant: str, path: str, ttl_seconds: int) -> CheckpointRecord:
        """Expire `ttl_seconds` from now; 0 removes the expiry."""
        check_ttl(ttl_seconds)
        record = self.get(tenant, path)
        key = record.path.storage_key(tenant)
        metadata = dict(self._store.manifest(key).metadata)
        metadata["expire_time"] = self._clock() + ttl_seconds if ttl_seconds else None
        return _record(self._store.update_metadata(key, metadata))

    def sweep(self) -> int:
        """Delete every expired checkpoint of every tenant; returns how many."""
        removed = 0
        for manifest in self._store.list(""):
            if self._expired(manifest):
                try:
                    self._store.delete(manifest.key)
                except NotFoundError:  # deleted concurrently
                    continue
                self.usage.free(manifest.key, manifest.size_bytes)
                removed += 1
        if removed:
            log.info("expiry sweep deleted %d checkpoints", removed)
        return removed

    def _find(self, key: str) -> Manifest | None:
        try:
            return self._store.manifest(key)
        except NotFoundError:
            return None

    def _expired(self, manifest: Manifest) -> bool:
        expire = manifest.metadata.get("expire_time")
        return expire is not None and expire <= self._clock()


def _required_files(spec: CheckpointSpec) -> set[str]:
    files = {peft_format.CONFIG_FILE, peft_format.WEIGHTS_FILE}
    return files | {peft_format.OPTIMIZER_FILE} if spec.has_optimizer_state else files


def check_file_name(name: str) -> str:
    if name not in ALLOWED_FILES:
        raise InvalidArgumentError("BAD_CHECKPOINT_FILES", f"unexpected file {name[:100]!r}; allowed: {sorted(ALLOWED_FILES)}")
    return name


def _check_spec(spec: CheckpointSpec) -> None:
    check_ttl(spec.ttl_seconds)
    check_user_metadata(spec.user_metadata)
    if spec.has_optimizer_state and spec.path.kind is not CheckpointKind.STATE:
        raise InvalidArgumentError("BAD_CHECKPOINT_KIND", "only state checkpoints hold optimizer state")
    if not spec.base_model:
        raise InvalidArgumentError("MISSING_BASE_MODEL", "a checkpoint must name its base model")


def _exists(path: CheckpointPath) -> TunemeshError:
    return AlreadyExistsError("CHECKPOINT_EXISTS", f"checkpoint {path} already exists; names are immutable")


def _record(manifest: Manifest) -> CheckpointRecord:
    meta = manifest.metadata
    return CheckpointRecord(
        path=CheckpointPath.parse(meta["path"]),
        base_model=meta["base_model"],
        lora=dict(meta["lora"]),
        step=int(meta["step"]),
        has_optimizer_state=bool(meta["has_optimizer_state"]),
        user_metadata=dict(meta.get("user_metadata") or {}),
        create_time=manifest.commit_time,
        expire_time=meta.get("expire_time"),
        files=manifest.blobs,
    )


def _digests(blobs: Iterable[BlobInfo]) -> dict[str, str]:
    return {b.name: b.sha256 for b in blobs}


def _file_chunks(store: CheckpointStore, key: str, files: tuple[BlobInfo, ...], chunk_size: int) -> Iterator[tuple[str, int, bytes]]:
    for info in files:
        offset = 0
        for chunk in store.read_blob(key, info.name, chunk_size):
            yield info.name, offset, chunk
            offset += len(chunk)


def _encode_token(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode()


def _decode_token(token: str) -> str:
    if not token:
        return ""
    try:
        key = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        key = ""
    if not key:
        raise InvalidArgumentError("INVALID_PAGE_TOKEN", f"bad page token {token[:100]!r}")
    return key

