"""`tunemesh checkpoints ...` against an in-process fake CheckpointService."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sdk"))
from checkpoint_fakes import API_KEY, FakeCheckpoints, serve  # noqa: E402

from tunemesh_local import cli, launcher, state  # noqa: E402
from tunemesh_local.checkpoints_cli import human_bytes  # noqa: E402

WEIGHTS = b"\x01\x02" * 3000


@pytest.fixture
def fake(monkeypatch, tmp_path):
    for name in ("TUNEMESH_ADDRESS", "TUNEMESH_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(state.STATE_DIR_ENV, str(tmp_path / "no-mesh"))
    servicer = FakeCheckpoints()
    server, port = serve(servicer)
    servicer.port = port
    yield servicer
    server.stop(None)


def tunemesh(fake: FakeCheckpoints, *args: str) -> int:
    action, *rest = args
    return cli.main(["checkpoints", action, "--address", f"127.0.0.1:{fake.port}",
                     "--api-key", API_KEY, *rest])


def add(fake: FakeCheckpoints, name: str, run: str = "r1") -> str:
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": WEIGHTS}
    return fake.add(run, "sampler", name, files, step=7)


def test_list_prints_a_table_of_paths(fake, capsys):
    paths = [add(fake, "a"), add(fake, "b"), add(fake, "c", run="r2")]
    assert tunemesh(fake, "list") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["PATH", "KIND", "STEP", "SIZE", "CREATED", "EXPIRES"]
    for path in paths:
        assert path in out
    assert "sampler" in out and "5.9 KiB" in out and "never" in out
    assert fake.auth == [f"Bearer {API_KEY}"]


def test_list_of_one_run_as_json(fake, capsys):
    add(fake, "a")
    add(fake, "b", run="r2")
    assert tunemesh(fake, "list", "--run", "runs/r2", "--json") == 0
    (only,) = json.loads(capsys.readouterr().out)
    assert only["path"] == "tunemesh://runs/r2/sampler/b" and only["expire_time"] is None
    assert only["files"][1]["size_bytes"] == len(WEIGHTS)


def test_get_ttl_and_delete(fake, capsys):
    path = add(fake, "a")
    assert tunemesh(fake, "get", path) == 0
    assert "adapter_model.safetensors" in capsys.readouterr().out
    assert tunemesh(fake, "ttl", path, "60") == 0
    assert "expires at 2023-11-14 22:14:20Z" in capsys.readouterr().out
    assert tunemesh(fake, "ttl", path, "none") == 0
    assert "never expires" in capsys.readouterr().out
    assert tunemesh(fake, "delete", path) == 0
    assert path not in fake.checkpoints


def test_download_writes_the_files(fake, tmp_path, capsys):
    path = add(fake, "a")
    dest = tmp_path / "out"
    assert tunemesh(fake, "download", path, str(dest)) == 0
    assert (dest / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert tunemesh(fake, "download", path, str(dest)) == 1
    assert "already exists" in capsys.readouterr().err
    assert tunemesh(fake, "download", path, str(dest), "--overwrite") == 0


def test_import_uploads_a_peft_directory(fake, tmp_path, capsys):
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    (peft / "adapter_model.safetensors").write_bytes(WEIGHTS)
    assert tunemesh(fake, "import", str(peft), "--base-model", "tiny-dense", "--name", "mine",
                    "--ttl", "30") == 0
    assert "tunemesh://imports/mine" in capsys.readouterr().out
    assert fake.imports[0][0].header.ttl_seconds == 30
    assert fake.contents["tunemesh://imports/mine"]["adapter_model.safetensors"] == WEIGHTS


def test_a_failed_call_exits_1_with_the_message(fake, capsys):
    assert tunemesh(fake, "get", "tunemesh://imports/nope") == 1
    err = capsys.readouterr().err
    assert err.startswith("tunemesh checkpoints: NOT_FOUND")
    assert "no checkpoint tunemesh://imports/nope" in err


def test_without_an_api_key_the_local_mesh_keys_are_suggested(fake, tmp_path, capsys):
    keys = launcher.ensure_api_keys(launcher.MeshConfig(state_dir=tmp_path))
    state.save(state.MeshState(str(tmp_path), "", str(keys), [], scheduler_address="x:1"))
    argv = ["checkpoints", "list", "--state-dir", str(tmp_path)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"keys of alice, bob are in {tmp_path / 'client_keys.json'}" in err
    assert "tml-" not in err  # the keys themselves are not printed
    assert fake.auth == []


def test_the_local_mesh_scheduler_is_the_default_address(fake, tmp_path, monkeypatch, capsys):
    add(fake, "a")
    state.save(state.MeshState(str(tmp_path), "", "", [],
                               scheduler_address=f"127.0.0.1:{fake.port}"))
    monkeypatch.setenv("TUNEMESH_API_KEY", API_KEY)
    assert cli.main(["checkpoints", "list", "--state-dir", str(tmp_path)]) == 0
    assert "tunemesh://runs/r1/sampler/a" in capsys.readouterr().out


@pytest.mark.parametrize("size, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                        (5 * 1024**3, "5.0 GiB")])
def test_human_bytes(size, text):
    assert human_bytes(size) == text
