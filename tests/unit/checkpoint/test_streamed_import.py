"""Imports streamed to the store chunk by chunk (adapter_import.py, file_feed.py): the same
checkpoint as a whole-file import, a malformed weights header refused before the rest of
the file is read, refusals from either side of the feed leaving nothing behind."""

from __future__ import annotations

import asyncio
import json
import struct

import pytest

from tunemesh_checkpoint.catalog import CheckpointCatalog
from tunemesh_checkpoint.file_feed import write_files
from tunemesh_checkpoint.quota import TenantUsage
from tunemesh_checkpoint.store import FilesystemStore
from tunemesh_common.checkpoints.paths import tenant_segment
from tunemesh_common.lora import peft_format
from tunemesh.errors import InvalidArgumentError, ResourceExhaustedError

CONFIG, WEIGHTS = peft_format.CONFIG_FILE, peft_format.WEIGHTS_FILE
BASE = "tunemesh/tiny-dense"
KEY = "base_model.model.model.layers.0.self_attn.q_proj"


def adapter(width: int = 64, rank: int = 4) -> dict[str, bytes]:
    size = rank * width * 4
    header = {f"{KEY}.lora_A.weight": {"dtype": "F32", "shape": [rank, width], "data_offsets": [0, size]},
              f"{KEY}.lora_B.weight": {"dtype": "F32", "shape": [width, rank], "data_offsets": [size, 2 * size]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    weights = struct.pack("<Q", len(raw)) + raw + bytes(range(256)) * (2 * size // 256) + bytes(2 * size % 256)
    config = json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj"]}).encode()
    return {CONFIG: config, WEIGHTS: weights}


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.fixture
def store(tmp_path) -> FilesystemStore:
    return FilesystemStore(tmp_path / "store", fsync=False)


def leftovers(store: FilesystemStore) -> list:
    return list((store.root / "staging").iterdir())


def streamed(catalog: CheckpointCatalog, name: str, files: dict[str, bytes], chunk: int = 7):
    with catalog.open_import("alice", name, BASE) as adapter_import:
        for file_name, data in files.items():
            adapter_import.write_file(file_name, iter(pieces(data, chunk)))
        return adapter_import.commit()


def test_a_streamed_import_equals_a_whole_one(store):
    catalog = CheckpointCatalog(store)
    files = adapter()
    whole = catalog.import_peft("alice", "whole", BASE, files)
    chunked = streamed(catalog, "chunked", {WEIGHTS: files[WEIGHTS], CONFIG: files[CONFIG]})
    assert chunked.files == whole.files and chunked.lora == whole.lora
    assert leftovers(store) == []


def test_a_bad_header_is_refused_before_the_rest_of_the_file_is_read(store):
    catalog = CheckpointCatalog(store)
    weights = struct.pack("<Q", 16) + b"{not json at all" + bytes(1 << 16)
    consumed = []

    def chunks():
        for piece in pieces(weights, 8):
            consumed.append(piece)
            yield piece

    with pytest.raises(InvalidArgumentError) as info, catalog.open_import("alice", "bad", BASE) as adapter_import:
        adapter_import.write_file(WEIGHTS, chunks())
    assert info.value.reason == "BAD_SAFETENSORS" and len(consumed) <= 4
    assert leftovers(store) == [] and store.list("") == []


@pytest.mark.parametrize("weights", [struct.pack("<Q", 1 << 40), b"\x01\x00", adapter()[WEIGHTS][:-1]],
                         ids=["huge-header", "too-short", "truncated"])
def test_malformed_weights_are_refused(store, weights):
    catalog = CheckpointCatalog(store)
    with pytest.raises(InvalidArgumentError) as info:
        streamed(catalog, "bad", {CONFIG: adapter()[CONFIG], WEIGHTS: weights})
    assert info.value.reason == "BAD_SAFETENSORS" and leftovers(store) == []


def test_a_config_over_its_limit_is_refused(store):
    catalog = CheckpointCatalog(store)
    with pytest.raises(InvalidArgumentError) as info:
        streamed(catalog, "bad", {CONFIG: b" " * (2 << 20), WEIGHTS: adapter()[WEIGHTS]}, chunk=1 << 16)
    assert info.value.reason == "BAD_ADAPTER_CONFIG" and leftovers(store) == []


async def _chunks_of(files: dict[str, bytes], size: int, fail_after: int | None = None):
    sent = 0
    for name, data in files.items():
        for piece in pieces(data, size):
            if fail_after is not None and sent == fail_after:
                raise InvalidArgumentError("BAD_UPLOAD", "the stream broke")
            sent += 1
            yield name, piece


def _feed_import(catalog: CheckpointCatalog, files: dict[str, bytes], size: int, fail_after: int | None = None):
    async def run():
        adapter_import = catalog.open_import("alice", "fed", BASE)
        try:
            await write_files(_chunks_of(files, size, fail_after), adapter_import.write_file, depth=2)
            return adapter_import.commit()
        finally:
            if not adapter_import.committed:
                adapter_import.abort()
    return asyncio.run(run())


def test_the_feed_imports_through_a_worker_thread(store):
    catalog = CheckpointCatalog(store)
    record = _feed_import(catalog, adapter(width=4096), 1000)
    assert record.files == catalog.import_peft("alice", "direct", BASE, adapter(width=4096)).files


def test_an_error_of_the_stream_stops_the_writer_and_leaves_nothing(store):
    catalog = CheckpointCatalog(store)
    with pytest.raises(InvalidArgumentError, match="the stream broke"):
        _feed_import(catalog, {CONFIG: adapter()[CONFIG], WEIGHTS: adapter(width=4096)[WEIGHTS]}, 1000, fail_after=20)
    assert leftovers(store) == [] and store.list("") == []


def test_a_quota_refusal_of_the_writer_reaches_the_stream(store):
    catalog = CheckpointCatalog(store, usage=TenantUsage(limit_bytes=50_000))
    with pytest.raises(ResourceExhaustedError) as info:
        _feed_import(catalog, {CONFIG: adapter()[CONFIG], WEIGHTS: adapter(width=4096)[WEIGHTS]}, 1000)
    assert info.value.reason == "STORAGE_QUOTA"
    assert leftovers(store) == [] and catalog.usage.reserved(tenant_segment("alice")) == 0
