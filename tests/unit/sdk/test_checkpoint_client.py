"""CheckpointClient against an in-process fake CheckpointService."""

from __future__ import annotations

import datetime
import hashlib
import json
import os

import grpc
import pytest
from checkpoint_fakes import API_KEY, FakeCheckpoints, serve

import tunemesh
from tunemesh.checkpoints import CHUNK_BYTES, PEFT_FILES
from tunemesh.v1 import checkpoints_pb2

FAST_RETRY = tunemesh.RetryPolicy(
    initial_backoff_s=0.01, max_backoff_s=0.05, total_timeout_s=5.0, attempt_timeout_s=5.0
)
CONFIG = json.dumps({"r": 8, "lora_alpha": 16}).encode()
WEIGHTS = bytes(range(256)) * 40  # 10 KiB: several fake-server chunks


@pytest.fixture
def fake():
    servicer = FakeCheckpoints()
    server, port = serve(servicer)
    servicer.port = port
    yield servicer
    server.stop(None)


@pytest.fixture
def client(fake):
    service = tunemesh.ServiceClient(f"127.0.0.1:{fake.port}", API_KEY, retry_policy=FAST_RETRY)
    yield service.create_checkpoint_client()
    service.close()


def add_state(fake: FakeCheckpoints, name: str = "step-10", run: str = "r1") -> str:
    files = {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS}
    return fake.add(run, "state", name, files, step=10)


def test_list_follows_page_tokens_across_three_pages(fake, client):
    paths = [add_state(fake, f"ckpt-{i}") for i in range(5)]
    add_state(fake, "other", run="r2")
    listed = list(client.list(run="runs/r1", page_size=2))
    assert [c.path for c in listed] == sorted(paths)
    page_requests = [r for r in fake.requests if isinstance(r, checkpoints_pb2.ListCheckpointsRequest)]
    assert [r.page_token for r in page_requests] == ["", "2", "4"]
    assert all(r.run == "runs/r1" and r.page_size == 2 for r in page_requests)


def test_list_page_returns_the_next_token(fake, client):
    for i in range(3):
        add_state(fake, f"ckpt-{i}")
    page, token = client.list_page(page_size=2)
    assert len(page) == 2 and token == "2"
    page, token = client.list_page(page_size=2, page_token=token)
    assert len(page) == 1 and token == ""


def test_get_decodes_every_field(fake, client):
    path = add_state(fake)
    ckpt = client.get(path)
    assert ckpt.path == path and ckpt.kind == "state" and ckpt.run == "runs/r1"
    assert ckpt.name == "step-10" and ckpt.base_model == "tiny-dense" and ckpt.step == 10
    assert ckpt.has_optimizer_state and ckpt.size_bytes == len(CONFIG) + len(WEIGHTS)
    assert ckpt.lora_config == tunemesh.LoraConfig(rank=8, alpha=16.0)
    assert ckpt.create_time == datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=datetime.timezone.utc)
    assert ckpt.expire_time is None
    assert ckpt.files[1] == tunemesh.CheckpointFile(
        "adapter_model.safetensors", len(WEIGHTS), hashlib.sha256(WEIGHTS).hexdigest()
    )
    assert fake.auth == [f"Bearer {API_KEY}"]


def test_get_unknown_path_raises_not_found(client):
    with pytest.raises(tunemesh.NotFoundError) as info:
        client.get("tunemesh://runs/x/state/nope")
    assert info.value.reason == "CHECKPOINT_NOT_FOUND"


def test_delete_removes_the_checkpoint(fake, client):
    path = add_state(fake)
    client.delete(path)
    assert path not in fake.checkpoints
    with pytest.raises(tunemesh.NotFoundError):
        client.delete(path)


def test_set_ttl_sets_and_clears_the_expiry(fake, client):
    path = add_state(fake)
    ckpt = client.set_ttl(path, 3600)
    assert ckpt.expire_time == ckpt.create_time + datetime.timedelta(seconds=3600)
    ckpt = client.set_ttl(path, None)
    assert ckpt.expire_time is None
    ttl_requests = [r for r in fake.requests if isinstance(r, checkpoints_pb2.UpdateCheckpointTtlRequest)]
    assert [r.ttl_seconds for r in ttl_requests] == [3600, 0]
    with pytest.raises(ValueError):
        client.set_ttl(path, 0)


def test_download_writes_exact_bytes_and_reports_progress(fake, client, tmp_path):
    path = add_state(fake)
    seen = []
    dest = client.download(path, tmp_path / "out", progress=lambda done, total: seen.append((done, total)))
    assert (dest / "adapter_config.json").read_bytes() == CONFIG
    assert (dest / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert sorted(os.listdir(dest)) == sorted(PEFT_FILES)
    total = len(CONFIG) + len(WEIGHTS)
    assert seen[-1] == (total, total) and len(seen) > 2
    assert fake.auth == [f"Bearer {API_KEY}"]


def test_download_with_a_wrong_sha_fails_and_leaves_no_file(fake, client, tmp_path):
    path = add_state(fake)
    fake.bad_sha = True
    with pytest.raises(tunemesh.TunemeshError) as info:
        client.download(path, tmp_path)
    assert info.value.code == grpc.StatusCode.DATA_LOSS
    assert info.value.reason == "CHECKSUM_MISMATCH"
    assert os.listdir(tmp_path) == []


def test_download_refuses_a_file_name_outside_dest(fake, client, tmp_path):
    path = add_state(fake)
    fake.file_names = {"adapter_model.safetensors": "../evil"}
    dest = tmp_path / "dest"
    with pytest.raises(tunemesh.TunemeshError) as info:
        client.download(path, dest)
    assert info.value.reason == "UNSAFE_FILE_NAME"
    assert sorted(os.listdir(tmp_path)) == ["dest"] and os.listdir(dest) == []


@pytest.mark.parametrize("name", ["/tmp/abs", "a/b", "..", "", "a\\b"])
def test_unsafe_file_names_are_refused(name):
    assert not tunemesh.checkpoints.is_safe_file_name(name)


def test_download_does_not_overwrite_without_the_flag(fake, client, tmp_path):
    path = add_state(fake)
    (tmp_path / "adapter_config.json").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        client.download(path, tmp_path)
    assert (tmp_path / "adapter_config.json").read_bytes() == b"mine"
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json"]
    client.download(path, tmp_path, overwrite=True)
    assert (tmp_path / "adapter_config.json").read_bytes() == CONFIG


def test_download_of_an_unknown_path_raises_not_found(client, tmp_path):
    with pytest.raises(tunemesh.NotFoundError):
        client.download("tunemesh://imports/nope", tmp_path)


def write_peft(directory, weights: bytes):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_bytes(CONFIG)
    (directory / "adapter_model.safetensors").write_bytes(weights)
    return directory


def test_import_sends_header_then_chunks_in_order_and_round_trips(fake, client, tmp_path):
    weights = os.urandom(2 * CHUNK_BYTES + 123)
    seen = []
    ckpt = client.import_peft(
        write_peft(tmp_path / "peft", weights), base_model="tiny-dense", name="mine",
        ttl_seconds=60, user_metadata={"who": "me"}, progress=lambda d, t: seen.append((d, t)),
    )
    assert ckpt.path == "tunemesh://imports/mine" and ckpt.kind == "imported"
    assert ckpt.user_metadata == {"who": "me"} and ckpt.run == ""
    (sent,) = fake.imports
    assert sent[0].WhichOneof("part") == "header"
    header = sent[0].header
    assert (header.name, header.base_model, header.ttl_seconds) == ("mine", "tiny-dense", 60)
    chunks = [r.chunk for r in sent[1:]]
    assert [c.file_name for c in chunks] == ["adapter_config.json"] + ["adapter_model.safetensors"] * 3
    assert [c.offset for c in chunks[1:]] == [0, CHUNK_BYTES, 2 * CHUNK_BYTES]
    assert fake.contents[ckpt.path]["adapter_model.safetensors"] == weights
    total = len(CONFIG) + len(weights)
    assert seen[-1] == (total, total)
    assert fake.auth == [f"Bearer {API_KEY}"]

    dest = client.download(ckpt.path, tmp_path / "back")
    assert (dest / "adapter_model.safetensors").read_bytes() == weights


def test_import_without_weights_raises_file_not_found(fake, client, tmp_path):
    directory = write_peft(tmp_path / "peft", b"w")
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        client.import_peft(directory, base_model="tiny-dense", name="x")
    assert fake.imports == []


def test_calls_without_the_right_key_are_unauthenticated(fake, tmp_path):
    with tunemesh.ServiceClient(f"127.0.0.1:{fake.port}", "wrong", retry_policy=FAST_RETRY) as service:
        with pytest.raises(tunemesh.UnauthenticatedError):
            list(service.create_checkpoint_client().list())
    assert fake.auth == ["Bearer wrong"]
