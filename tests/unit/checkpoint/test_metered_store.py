"""MeteredStore: same behaviour as the store it wraps; bytes and operation times recorded."""

from __future__ import annotations

import pathlib

import pytest
from prometheus_client import CollectorRegistry

from tunemesh_checkpoint.metered_store import MeteredStore
from tunemesh_checkpoint.store import CheckpointStore, FilesystemStore
from tunemesh.errors import NotFoundError
from tunemesh_checkpoint.metrics import CheckpointMetrics

KEY = "alice/runs/r1/state/step-1"


@pytest.fixture
def metered(tmp_path: pathlib.Path) -> tuple[MeteredStore, CollectorRegistry]:
    registry = CollectorRegistry()
    return MeteredStore(FilesystemStore(tmp_path / "ckpt", fsync=False), CheckpointMetrics(registry)), registry


def _ops(registry: CollectorRegistry, op: str, result: str = "ok") -> float:
    return registry.get_sample_value("tunemesh_checkpoint_op_duration_seconds_count",
                                     {"op": op, "result": result}) or 0.0


def test_writes_and_reads_count_their_bytes_and_time_each_operation(metered):
    store, registry = metered
    assert isinstance(store, CheckpointStore)
    with store.writer(KEY) as writer:
        writer.write_blob("a.bin", [b"x" * 1000, b"y" * 24])
        writer.write_blob("b.json", [b"{}"])
        writer.commit({"step": 1})
    assert b"".join(store.read_blob(KEY, "a.bin", chunk_size=100)) == b"x" * 1000 + b"y" * 24
    assert [m.key for m in store.list("alice")] == [KEY]
    store.update_metadata(KEY, {"step": 2})
    get = registry.get_sample_value
    assert get("tunemesh_checkpoint_write_bytes_total") == 1026
    assert get("tunemesh_checkpoint_read_bytes_total") == 1024
    assert (_ops(registry, "write_file"), _ops(registry, "commit"), _ops(registry, "read_file")) == (2, 1, 1)
    assert (_ops(registry, "list"), _ops(registry, "update")) == (1, 1)
    store.delete(KEY)
    assert _ops(registry, "delete") == 1


def test_a_missing_checkpoint_reads_as_not_found_and_an_abandoned_read_as_error(metered):
    store, registry = metered
    with pytest.raises(NotFoundError):
        store.manifest(KEY)
    with pytest.raises(NotFoundError):
        store.read_blob(KEY, "a.bin")  # raised by the call itself, as the store promises
    assert (_ops(registry, "manifest", "not_found"), _ops(registry, "read_file", "not_found")) == (1, 1)
    with store.writer(KEY) as writer:
        writer.write_blob("a.bin", [b"z" * 300])
        writer.commit({})
    chunks = store.read_blob(KEY, "a.bin", chunk_size=100)
    assert next(chunks) == b"z" * 100
    chunks.close()
    assert _ops(registry, "read_file", "error") == 1
    assert registry.get_sample_value("tunemesh_checkpoint_read_bytes_total") == 100
