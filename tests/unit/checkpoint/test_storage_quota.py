"""The per-tenant byte quota of the checkpoint catalog (STORAGE_QUOTA: refused before the
bytes reach the disk, atomic across concurrent writes, freed by deletes and expiry,
counted again at start) and full disks (DISK_FULL, not INTERNAL, no partial file)."""

from __future__ import annotations

import errno
import io
import os
import pathlib
import threading
import time

import pytest
from tunemesh_checkpoint import call_store as call_store_module
from tunemesh_checkpoint import store as store_module
from tunemesh_checkpoint.call_store import FilesystemCallStore
from tunemesh_checkpoint.catalog import CheckpointCatalog, CheckpointSpec
from tunemesh_checkpoint.quota import TenantUsage
from tunemesh_checkpoint.store import FilesystemStore
from tunemesh_common.lora import peft_format
from tunemesh_common.checkpoints.paths import CheckpointPath, tenant_segment
from tunemesh.errors import Code, NotFoundError, ResourceExhaustedError

CONFIG, WEIGHTS = peft_format.CONFIG_FILE, peft_format.WEIGHTS_FILE
LORA = {"rank": 8, "alpha": 16.0, "train_attn": True, "train_mlp": True, "train_unembed": False,
        "train_experts": False, "seed": 3}
BASE = "Qwen/Qwen3-0.6B"


def sampler(name: str, run: str = "r1") -> str:
    return f"tunemesh://runs/{run}/sampler/{name}"


def spec(path: str, ttl_seconds: int = 0) -> CheckpointSpec:
    return CheckpointSpec(CheckpointPath.parse(path), BASE, LORA, 1, False, ttl_seconds)


def write(catalog: CheckpointCatalog, tenant: str, path: str, size: int, ttl_seconds: int = 0):
    """A sampler checkpoint of exactly `size` bytes (10 of config, the rest weights, 10-byte chunks)."""
    weights = bytes(size - 10)
    chunks = [weights[i:i + 10] for i in range(0, len(weights), 10)]
    return catalog.write(tenant, spec(path, ttl_seconds), [(CONFIG, [b"0123456789"]), (WEIGHTS, chunks)])


def files_under(root: pathlib.Path, area: str) -> list[str]:
    return sorted(p.relative_to(root / area).as_posix() for p in (root / area).rglob("*") if p.is_file())


@pytest.fixture
def now() -> list[float]:
    return [time.time()]


@pytest.fixture
def store(tmp_path: pathlib.Path) -> FilesystemStore:
    return FilesystemStore(tmp_path / "ckpt", fsync=False)


@pytest.fixture
def catalog(store: FilesystemStore, now: list[float]) -> CheckpointCatalog:
    return CheckpointCatalog(store, clock=lambda: now[0], usage=TenantUsage.counted(store, limit_bytes=1000))


def used(catalog: CheckpointCatalog, tenant: str) -> int:
    return catalog.usage.used(tenant_segment(tenant))


def test_writes_fit_up_to_the_quota_and_the_next_byte_is_refused(catalog, store):
    write(catalog, "alice", sampler("a"), 600)
    write(catalog, "alice", sampler("b"), 400)  # exactly the quota
    assert used(catalog, "alice") == 1000
    with pytest.raises(ResourceExhaustedError) as info:
        write(catalog, "alice", sampler("c"), 20)
    assert (info.value.reason, info.value.rpc_code) == ("STORAGE_QUOTA", Code.RESOURCE_EXHAUSTED)
    with pytest.raises(NotFoundError):
        catalog.get("alice", sampler("c"))
    write(catalog, "bob", sampler("a"), 1000)  # another tenant's quota is its own


def test_a_write_past_the_quota_stops_mid_stream_and_leaves_no_file(catalog, store):
    write(catalog, "alice", sampler("a"), 700)
    with pytest.raises(ResourceExhaustedError) as info:
        write(catalog, "alice", sampler("big"), 5000)
    assert info.value.reason == "STORAGE_QUOTA"
    assert files_under(store.root, "staging") == []  # neither the partial blob nor its directory
    assert [m.key for m in store.list("")] == [CheckpointPath.parse(sampler("a")).storage_key("alice")]
    assert (used(catalog, "alice"), catalog.usage.reserved(tenant_segment("alice"))) == (700, 0)
    write(catalog, "alice", sampler("b"), 300)  # the refused write gave its reservation back


def test_bytes_being_written_count_against_the_quota(catalog):
    """A write in progress holds its bytes: a second write of the tenant cannot use them."""
    seen = []

    def first_chunks():
        yield bytes(500)
        with pytest.raises(ResourceExhaustedError) as info:  # 10 + 500 reserved: 600 more do not fit
            write(catalog, "alice", sampler("second"), 600)
        seen.append(info.value.reason)
        yield bytes(100)

    catalog.write("alice", spec(sampler("first")), [(CONFIG, [b"0123456789"]), (WEIGHTS, first_chunks())])
    assert seen == ["STORAGE_QUOTA"] and used(catalog, "alice") == 610


def test_concurrent_writes_never_pass_the_quota(catalog, store):
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def one(i: int) -> None:
        barrier.wait()
        try:
            write(catalog, "alice", sampler(f"c{i}"), 300)
            outcomes.append("ok")
        except ResourceExhaustedError as exc:
            outcomes.append(exc.reason)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("ok") == 3 and outcomes.count("STORAGE_QUOTA") == 5
    stored = sum(m.size_bytes for m in store.list(""))
    assert stored == used(catalog, "alice") == 900
    assert catalog.usage.reserved(tenant_segment("alice")) == 0
    assert files_under(store.root, "staging") == []


def test_delete_and_expiry_free_the_quota(catalog, now):
    write(catalog, "alice", sampler("kept"), 400)
    write(catalog, "alice", sampler("deleted"), 300)
    write(catalog, "alice", sampler("expiring"), 300, ttl_seconds=60)
    with pytest.raises(ResourceExhaustedError):
        write(catalog, "alice", sampler("next"), 300)
    catalog.delete("alice", sampler("deleted"))
    assert used(catalog, "alice") == 700
    now[0] += 61
    assert catalog.sweep() == 1
    assert used(catalog, "alice") == 400
    write(catalog, "alice", sampler("next"), 600)


def test_usage_is_counted_from_the_store_at_start(store, now):
    first = CheckpointCatalog(store, clock=lambda: now[0])  # no quota: counts only
    write(first, "alice", sampler("a"), 800)
    write(first, "bob", sampler("a"), 100)
    restarted = CheckpointCatalog(store, clock=lambda: now[0], usage=TenantUsage.counted(store, 1000))
    assert (used(restarted, "alice"), used(restarted, "bob")) == (800, 100)
    with pytest.raises(ResourceExhaustedError):
        write(restarted, "alice", sampler("b"), 300)
    write(restarted, "bob", sampler("b"), 300)


def test_an_import_counts_against_the_quota(catalog, store, monkeypatch):
    monkeypatch.setattr(peft_format, "parse_config", lambda raw: type("C", (), {
        "rank": 8, "alpha": 16.0, "target_parameters": ()})())
    monkeypatch.setattr(peft_format, "read_header", lambda raw: {})
    monkeypatch.setattr(peft_format, "check_factors", lambda header, rank, params: {"q_proj"})
    write(catalog, "alice", sampler("a"), 900)
    with pytest.raises(ResourceExhaustedError) as info:
        catalog.import_peft("alice", "imp", BASE, {CONFIG: b"{}", WEIGHTS: bytes(500)})
    assert info.value.reason == "STORAGE_QUOTA"
    assert files_under(store.root, "staging") == [] and len(store.list("")) == 1


def test_snapshots_are_neither_counted_nor_refused(catalog):
    write(catalog, "alice", sampler("a"), 1000)
    snapshot = "tunemesh://runs/r1/state/snapshot-000007"
    files = [(CONFIG, [b"0123456789"]), (WEIGHTS, [bytes(500)]), (peft_format.OPTIMIZER_FILE, [bytes(500)])]
    path = CheckpointPath.parse(snapshot)
    catalog.write("alice", CheckpointSpec(path, BASE, LORA, 7, True), files)
    assert used(catalog, "alice") == 1000
    catalog.delete("alice", snapshot)
    assert used(catalog, "alice") == 1000


# ---- full disk ------------------------------------------------------------------------


class FullDisk:
    """Stands in for `open` in a module: the files it opens for writing take `room` bytes
    in all, then a write stores what still fits and raises ENOSPC (or `errno_`)."""

    def __init__(self, room: int, errno_: int = errno.ENOSPC) -> None:
        self.room, self.errno = room, errno_

    def __call__(self, path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        return _FillingFile(file, self) if "w" in mode or "x" in mode else file


class _FillingFile:
    def __init__(self, file: io.BufferedWriter, disk: FullDisk) -> None:
        self._file, self._disk = file, disk

    def write(self, data) -> int:
        if len(data) > self._disk.room:
            self._file.write(bytes(data[:self._disk.room]))  # a partial write, as a real full disk leaves
            self._disk.room = 0
            raise OSError(self._disk.errno, os.strerror(self._disk.errno))
        self._disk.room -= len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self._file.close()


@pytest.mark.parametrize("errno_", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_while_writing_a_blob_is_disk_full_and_leaves_nothing(store, monkeypatch, errno_):
    catalog = CheckpointCatalog(store)
    monkeypatch.setattr(store_module, "open", FullDisk(room=200, errno_=errno_), raising=False)
    with pytest.raises(ResourceExhaustedError) as info:
        write(catalog, "alice", sampler("a"), 600)
    assert (info.value.reason, info.value.rpc_code) == ("DISK_FULL", Code.RESOURCE_EXHAUSTED)
    assert files_under(store.root, "staging") == [] and store.list("") == []
    assert catalog.usage.reserved(tenant_segment("alice")) == 0


def test_a_full_disk_while_writing_the_manifest_is_disk_full_and_leaves_nothing(store, monkeypatch):
    catalog = CheckpointCatalog(store)
    monkeypatch.setattr(store_module, "open", FullDisk(room=600), raising=False)  # the blobs fit, the manifest not
    with pytest.raises(ResourceExhaustedError) as info:
        write(catalog, "alice", sampler("a"), 600)
    assert info.value.reason == "DISK_FULL"
    assert files_under(store.root, "staging") == [] and files_under(store.root, "objects") == []


def test_a_full_disk_while_updating_metadata_keeps_the_old_manifest(store, monkeypatch):
    catalog = CheckpointCatalog(store)
    write(catalog, "alice", sampler("a"), 100)
    monkeypatch.setattr(store_module, "open", FullDisk(room=10), raising=False)
    with pytest.raises(ResourceExhaustedError) as info:
        catalog.set_ttl("alice", sampler("a"), 60)
    assert info.value.reason == "DISK_FULL"
    monkeypatch.undo()
    assert catalog.get("alice", sampler("a")).expire_time is None
    key = CheckpointPath.parse(sampler("a")).storage_key("alice")
    stored = sorted(p.name for p in (store.root / "objects" / key).iterdir())
    assert stored == sorted([CONFIG, WEIGHTS, "manifest.json"])  # no stray manifest.json.tmp


def test_other_os_errors_are_not_disk_full(store, monkeypatch):
    catalog = CheckpointCatalog(store)
    monkeypatch.setattr(store_module, "open", FullDisk(room=0, errno_=errno.EIO), raising=False)
    with pytest.raises(OSError) as info:
        write(catalog, "alice", sampler("a"), 100)
    assert info.value.errno == errno.EIO


def test_a_full_disk_in_the_call_store_is_disk_full_and_keeps_the_old_call(tmp_path, monkeypatch):
    calls = FilesystemCallStore(tmp_path / "calls", fsync=False)
    calls.put("runs/r1", 1, [b"kept"])
    monkeypatch.setattr(call_store_module, "open", FullDisk(room=5), raising=False)
    for seq_id in (1, 2):
        with pytest.raises(ResourceExhaustedError) as info:
            calls.put("runs/r1", seq_id, [b"a new call, longer than the room left"])
        assert info.value.reason == "DISK_FULL"
    monkeypatch.undo()
    assert b"".join(calls.read("runs/r1", 1)) == b"kept"
    assert sorted(p.name for p in (tmp_path / "calls" / "r1").iterdir()) == [f"{1:020d}"]
