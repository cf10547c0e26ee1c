"""FilesystemStore: round trips, immutability, listing, deletion, validation, corruption."""

from __future__ import annotations

import hashlib
import json
import pathlib
import threading

import pytest
from tunemesh_checkpoint.store import (
    BlobInfo,
    CheckpointStore,
    FilesystemStore,
    Manifest,
)
from tunemesh.errors import (
    AlreadyExistsError,
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)

KEY = "alice/runs/3f2a/state/step-10"


@pytest.fixture
def store(tmp_path: pathlib.Path) -> FilesystemStore:
    return FilesystemStore(tmp_path / "ckpt", fsync=False)


def commit(store: FilesystemStore, key: str, blobs: dict[str, bytes], metadata: dict | None = None) -> Manifest:
    with store.writer(key) as writer:
        for name, data in blobs.items():
            writer.write_blob(name, [data])
        return writer.commit(metadata or {})


def read(store: FilesystemStore, key: str, name: str, chunk_size: int = 1 << 20) -> bytes:
    return b"".join(store.read_blob(key, name, chunk_size=chunk_size))


def staging_entries(store: FilesystemStore) -> list[pathlib.Path]:
    return list((store.root / "staging").iterdir())


def test_filesystem_store_satisfies_the_protocol(store):
    assert isinstance(store, CheckpointStore)


def test_round_trip_of_several_blobs(store):
    big_chunks = [bytes([i]) * 1000 for i in range(7)]
    big = b"".join(big_chunks)
    small = b'{"r": 8}'
    with store.writer(KEY) as writer:
        info = writer.write_blob("adapter_model.safetensors", iter(big_chunks))
        writer.write_blob("adapter_config.json", [small])
        writer.write_blob("empty.bin", [])
        written = writer.commit({"step": 10, "tags": ["a"]})

    assert info == BlobInfo("adapter_model.safetensors", len(big), hashlib.sha256(big).hexdigest())
    manifest = store.manifest(KEY)
    assert manifest == written
    assert manifest.metadata == {"step": 10, "tags": ["a"]}
    assert manifest.size_bytes == len(big) + len(small)
    assert manifest.blob("empty.bin") == BlobInfo("empty.bin", 0, hashlib.sha256(b"").hexdigest())
    assert manifest.blob("adapter_config.json").sha256 == hashlib.sha256(small).hexdigest()
    assert read(store, KEY, "adapter_model.safetensors", chunk_size=333) == big
    assert list(store.read_blob(KEY, "adapter_model.safetensors", chunk_size=333))[0] == big[:333]
    assert read(store, KEY, "adapter_config.json") == small
    assert read(store, KEY, "empty.bin") == b""
    assert staging_entries(store) == []


def test_manifest_json_on_disk_has_the_documented_fields(store):
    commit(store, KEY, {"w.bin": b"xyz"}, {"ttl_s": 60})
    doc = json.loads((store.root / "objects" / KEY / "manifest.json").read_text())
    assert doc["format"] == 1
    assert doc["key"] == KEY
    assert doc["metadata"] == {"ttl_s": 60}
    assert isinstance(doc["commit_time"], float)
    assert doc["blobs"] == [{"name": "w.bin", "size": 3, "sha256": hashlib.sha256(b"xyz").hexdigest()}]


def test_unknown_blob_and_checkpoint_are_not_found(store):
    commit(store, KEY, {"w.bin": b"x"})
    with pytest.raises(NotFoundError) as err:
        store.read_blob(KEY, "other.bin")
    assert err.value.reason == "BLOB_NOT_FOUND"
    with pytest.raises(NotFoundError) as err:
        store.manifest("alice/runs/none")
    assert err.value.reason == "CHECKPOINT_NOT_FOUND"


def test_second_commit_of_a_key_fails_and_keeps_the_original(store):
    commit(store, KEY, {"w.bin": b"first"}, {"n": 1})
    with pytest.raises(AlreadyExistsError) as err:
        commit(store, KEY, {"w.bin": b"second"}, {"n": 2})
    assert err.value.reason == "CHECKPOINT_EXISTS"
    assert read(store, KEY, "w.bin") == b"first"
    assert store.manifest(KEY).metadata == {"n": 1}
    assert staging_entries(store) == []


def test_two_open_writers_of_one_key_only_one_wins(store):
    first, second = store.writer(KEY), store.writer(KEY)
    first.write_blob("w.bin", [b"1"])
    second.write_blob("w.bin", [b"2"])
    first.commit({})
    with pytest.raises(AlreadyExistsError):
        second.commit({})
    assert read(store, KEY, "w.bin") == b"1"
    assert staging_entries(store) == []


def test_concurrent_commits_of_one_key_have_one_winner(store):
    writers = [store.writer(KEY) for _ in range(8)]
    for i, writer in enumerate(writers):
        writer.write_blob("w.bin", [str(i).encode()])
    barrier = threading.Barrier(len(writers))
    outcomes: list[str] = []

    def race(writer):
        barrier.wait()
        try:
            writer.commit({})
            outcomes.append("won")
        except AlreadyExistsError:
            outcomes.append("lost")

    threads = [threading.Thread(target=race, args=(w,)) for w in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["lost"] * 7 + ["won"]
    winner = next(i for i, w in enumerate(writers) if w.committed)
    assert read(store, KEY, "w.bin") == str(winner).encode()
    assert staging_entries(store) == []


def test_a_key_inside_or_above_a_checkpoint_conflicts(store):
    commit(store, KEY, {"w.bin": b"x"})
    for key in (KEY + "/deeper", KEY + "/w.bin", "alice/runs/3f2a"):
        with pytest.raises(FailedPreconditionError):
            commit(store, key, {"w.bin": b"y"})
    assert [m.key for m in store.list("")] == [KEY]


def test_abort_and_an_exception_in_the_context_leave_nothing(store):
    writer = store.writer(KEY)
    writer.write_blob("w.bin", [b"data"])
    writer.abort()
    writer.abort()
    with pytest.raises(FailedPreconditionError):
        writer.commit({})

    with pytest.raises(RuntimeError):
        with store.writer(KEY) as writer:
            writer.write_blob("w.bin", [b"data"])
            raise RuntimeError("trainer died")

    with store.writer(KEY) as writer:
        writer.write_blob("w.bin", [b"never committed"])

    assert staging_entries(store) == []
    assert store.list("") == []
    with pytest.raises(NotFoundError):
        store.manifest(KEY)


def test_a_failing_chunk_stream_leaves_no_partial_blob(store):
    def chunks():
        yield b"part"
        raise OSError("upload broke")

    with store.writer(KEY) as writer:
        with pytest.raises(OSError):
            writer.write_blob("w.bin", chunks())
        writer.write_blob("ok.bin", [b"ok"])
        writer.commit({})
    manifest = store.manifest(KEY)
    assert [b.name for b in manifest.blobs] == ["ok.bin"]
    assert sorted(p.name for p in (store.root / "objects" / KEY).iterdir()) == ["manifest.json", "ok.bin"]


def test_blob_names_are_checked_and_unique(store):
    with store.writer(KEY) as writer:
        for name in ("manifest.json", "manifest.json.tmp", "../x", "a/b", "", ".hidden"):
            with pytest.raises(InvalidArgumentError):
                writer.write_blob(name, [b"x"])
        writer.write_blob("w.bin", [b"x"])
        with pytest.raises(AlreadyExistsError):
            writer.write_blob("w.bin", [b"y"])


def test_metadata_must_be_a_json_object(store):
    with store.writer(KEY) as writer:
        for metadata in ([1], {"x": object()}, {"x": float("nan")}):
            with pytest.raises(InvalidArgumentError):
                writer.commit(metadata)
    assert staging_entries(store) == []


def test_list_by_prefix_is_by_path_segment_and_sorted(store):
    keys = ["alice/runs/b/s/2", "alice/runs/a/s/1", "alice/runs/b/s/10", "alice2/runs/a/s/1", "bob/runs/a/s/1"]
    for key in keys:
        commit(store, key, {"w.bin": key.encode()})

    assert [m.key for m in store.list("alice")] == sorted(keys[:3])
    assert [m.key for m in store.list("alice/runs/b")] == ["alice/runs/b/s/10", "alice/runs/b/s/2"]
    assert [m.key for m in store.list("alice2")] == ["alice2/runs/a/s/1"]
    assert [m.key for m in store.list("alice/runs/a/s/1")] == ["alice/runs/a/s/1"]
    assert [m.key for m in store.list("")] == sorted(keys)
    assert store.list("carol") == []
    assert store.list("alice/runs/a/s") != []
    with pytest.raises(InvalidArgumentError):
        store.list("alice/")


def test_delete_removes_the_checkpoint_and_empty_parents(store):
    commit(store, "alice/runs/a/s/1", {"w.bin": b"1"})
    commit(store, "alice/runs/b/s/1", {"w.bin": b"2"})
    store.delete("alice/runs/a/s/1")

    with pytest.raises(NotFoundError):
        store.manifest("alice/runs/a/s/1")
    with pytest.raises(NotFoundError):
        store.delete("alice/runs/a/s/1")
    assert [m.key for m in store.list("alice")] == ["alice/runs/b/s/1"]
    objects = store.root / "objects"
    assert not (objects / "alice/runs/a").exists()
    assert (objects / "alice/runs/b/s/1").is_dir()
    assert list((store.root / "trash").iterdir()) == []

    store.delete("alice/runs/b/s/1")
    assert list(objects.iterdir()) == []
    commit(store, "alice/runs/a/s/1", {"w.bin": b"again"})
    assert read(store, "alice/runs/a/s/1", "w.bin") == b"again"


def test_delete_of_a_namespace_directory_is_not_found(store):
    commit(store, KEY, {"w.bin": b"1"})
    with pytest.raises(NotFoundError):
        store.delete("alice/runs")
    assert store.manifest(KEY).key == KEY


@pytest.mark.parametrize(
    "key",
    [
        "..",
        "alice/../bob",
        "a..b",
        "/abs",
        "a//b",
        "a/b/",
        "a\x00b",
        "%2e%2e/x",
        "a/" + "x" * 129,
        "",
        ".hidden",
        "-dash",
        "a b",
        "a\\b",
        "a/b\n",
        "é",
        None,
    ],
)
def test_bad_keys_are_invalid_arguments(store, key):
    for call in (store.writer, store.manifest, store.delete, lambda k: store.update_metadata(k, {})):
        with pytest.raises(InvalidArgumentError) as err:
            call(key)
        assert err.value.reason == "BAD_CHECKPOINT_KEY"
    with pytest.raises(InvalidArgumentError):
        store.read_blob(key, "w.bin")
    if key:
        with pytest.raises(InvalidArgumentError):
            store.list(key)


def test_longest_segment_is_accepted(store):
    key = "a/" + "x" * 128
    commit(store, key, {"w.bin": b"x"})
    assert store.manifest(key).key == key


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
def test_a_damaged_blob_raises_data_loss_when_read(store, damage):
    data = bytes(range(256)) * 40
    commit(store, KEY, {"w.bin": data})
    path = store.root / "objects" / KEY / "w.bin"
    if damage == "flip":
        path.write_bytes(data[:100] + b"\xff" + data[101:])
    elif damage == "truncate":
        path.write_bytes(data[:-1])
    else:
        path.write_bytes(data + b"!")
    with pytest.raises(DataLossError) as err:
        read(store, KEY, "w.bin", chunk_size=1000)
    assert err.value.reason == "CHECKSUM_MISMATCH"


def test_a_missing_blob_file_is_data_loss(store):
    commit(store, KEY, {"w.bin": b"x"})
    (store.root / "objects" / KEY / "w.bin").unlink()
    with pytest.raises(DataLossError):
        read(store, KEY, "w.bin")


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"format": 2}', b"", None],
)
def test_a_corrupt_manifest_is_data_loss_and_skipped_by_list(store, content, caplog):
    commit(store, "alice/runs/a/s/1", {"w.bin": b"1"})
    commit(store, "alice/runs/b/s/1", {"w.bin": b"2"})
    path = store.root / "objects" / "alice/runs/b/s/1" / "manifest.json"
    if content is None:
        doc = json.loads(path.read_text())
        doc["key"] = "bob/runs/x/s/1"
        content = json.dumps(doc).encode()
    path.write_bytes(content)

    with pytest.raises(DataLossError) as err:
        store.manifest("alice/runs/b/s/1")
    assert err.value.reason == "CORRUPT_MANIFEST"
    assert [m.key for m in store.list("alice")] == ["alice/runs/a/s/1"]
    assert "alice/runs/b/s/1" in caplog.text
    store.delete("alice/runs/b/s/1")
    assert [m.key for m in store.list("")] == ["alice/runs/a/s/1"]


def test_update_metadata_persists_across_store_instances(store):
    original = commit(store, KEY, {"w.bin": b"x"}, {"ttl_s": 60})
    updated = store.update_metadata(KEY, {"ttl_s": 3600, "pinned": True})

    assert updated.metadata == {"ttl_s": 3600, "pinned": True}
    assert updated.blobs == original.blobs
    assert updated.commit_time == original.commit_time
    reopened = FilesystemStore(store.root, fsync=False)
    assert reopened.manifest(KEY) == updated
    assert read(reopened, KEY, "w.bin") == b"x"
    assert not (store.root / "objects" / KEY / "manifest.json.tmp").exists()
    with pytest.raises(NotFoundError):
        store.update_metadata("alice/runs/none", {})
    with pytest.raises(InvalidArgumentError):
        store.update_metadata(KEY, {"x": {1, 2}})
    assert store.manifest(KEY).metadata == {"ttl_s": 3600, "pinned": True}


def test_returned_metadata_is_a_copy(store):
    metadata = {"tags": ["a"]}
    manifest = commit(store, KEY, {"w.bin": b"x"}, metadata)
    metadata["tags"].append("b")
    assert manifest.metadata == {"tags": ["a"]}
    assert store.manifest(KEY).metadata == {"tags": ["a"]}


def test_recover_removes_staging_trash_and_temp_manifests(store):
    commit(store, KEY, {"w.bin": b"kept"}, {"n": 1})
    abandoned = store.writer("alice/runs/x/s/1")
    abandoned.write_blob("w.bin", [b"partial"])
    (store.root / "trash" / "deadbeef").mkdir()
    (store.root / "trash" / "deadbeef" / "w.bin").write_bytes(b"old")
    (store.root / "objects" / KEY / "manifest.json.tmp").write_text("{half")

    fresh = FilesystemStore(store.root, fsync=False)
    assert fresh.recover() == 3
    assert staging_entries(fresh) == []
    assert list((store.root / "trash").iterdir()) == []
    assert not (store.root / "objects" / KEY / "manifest.json.tmp").exists()
    assert fresh.manifest(KEY).metadata == {"n": 1}
    assert read(fresh, KEY, "w.bin") == b"kept"
    assert fresh.recover() == 0


def test_store_does_not_recover_on_open(store):
    store.writer(KEY).write_blob("w.bin", [b"partial"])
    FilesystemStore(store.root, fsync=False)
    assert len(staging_entries(store)) == 1


def test_fsync_mode_round_trips(tmp_path):
    synced = FilesystemStore(tmp_path / "synced")
    commit(synced, KEY, {"w.bin": b"durable"}, {"n": 1})
    synced.update_metadata(KEY, {"n": 2})
    synced.delete(KEY)
    commit(synced, KEY, {"w.bin": b"again"})
    assert read(synced, KEY, "w.bin") == b"again"
