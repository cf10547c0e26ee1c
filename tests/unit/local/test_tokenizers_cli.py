"""`tunemesh tokenizers sync` against an in-process fake SessionService."""

from __future__ import annotations

import socket
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from tunemesh.errors import error_for, to_status
from tunemesh.v1 import sessions_pb2, sessions_pb2_grpc
from tunemesh_local import cli, hub_cache, state

API_KEY = "tm-test-key"
TINY = {"tokenizer.json": b'{"version": "1.0"}', "tokenizer_config.json": b"{}", "config.json": b"{}"}
OTHER = {"tokenizer.json": b'{"version": "2.0"}', "config.json": b'{"model_type": "llama"}'}


class FakeSessions(sessions_pb2_grpc.SessionServiceServicer):
    """Serves `models` (name -> files, or a (code, reason) error for GetTokenizer); checks the key."""

    def __init__(self, models: dict) -> None:
        self.models = models
        self.auth: list[str | None] = []
        self.lock = threading.Lock()

    def _check(self, context: grpc.ServicerContext) -> None:
        auth = dict(context.invocation_metadata()).get("authorization")
        with self.lock:
            self.auth.append(auth)
        if auth != f"Bearer {API_KEY}":
            context.abort_with_status(to_status(error_for(grpc.StatusCode.UNAUTHENTICATED, "BAD_API_KEY",
                                                          "unknown or revoked API key")))

    def GetCapabilities(self, request, context):
        self._check(context)
        return sessions_pb2.GetCapabilitiesResponse(
            models=[sessions_pb2.SupportedModel(name=name) for name in self.models])

    def GetTokenizer(self, request, context):
        self._check(context)
        answer = self.models[request.base_model]
        if isinstance(answer, tuple):
            context.abort_with_status(to_status(error_for(answer[0], answer[1], "no tokenizer here")))
        files = answer if isinstance(answer, list) else list(answer.items())
        return sessions_pb2.GetTokenizerResponse(
            files=[sessions_pb2.TokenizerFile(name=n, content=c) for n, c in files])


@pytest.fixture
def serve(monkeypatch, tmp_path):
    for name in ("TUNEMESH_ADDRESS", "TUNEMESH_API_KEY", "TUNEMESH_CA_BUNDLE", "HF_HOME", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(state.STATE_DIR_ENV, str(tmp_path / "no-mesh"))
    servers = []

    def start(models: dict) -> tuple[FakeSessions, int]:
        servicer = FakeSessions(models)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        sessions_pb2_grpc.add_SessionServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return servicer, port

    yield start
    for server in servers:
        server.stop(None)


def sync(port: int, hf_home: Path | None, *args: str, key: str = API_KEY) -> int:
    home = ["--hf-home", str(hf_home)] if hf_home is not None else []
    return cli.main(["tokenizers", "sync", "--address", f"127.0.0.1:{port}", "--api-key", key, *home, *args])


def snapshot_files(hub: Path, model: str) -> dict[str, bytes]:
    repo = hub / hub_cache.repo_folder(model)
    snapshot = repo / "snapshots" / (repo / "refs" / "main").read_text()
    return {p.name: p.read_bytes() for p in snapshot.iterdir()}


def test_every_served_model_is_written_and_a_rerun_changes_nothing(serve, tmp_path, capsys):
    fake, port = serve({"tunemesh/tiny-dense": TINY, "Org/Other-1.5B": OTHER})
    assert sync(port, tmp_path / "hf") == 0
    out = capsys.readouterr().out
    assert snapshot_files(tmp_path / "hf" / "hub", "tunemesh/tiny-dense") == TINY
    assert snapshot_files(tmp_path / "hf" / "hub", "Org/Other-1.5B") == OTHER
    revision = hub_cache.revision_of(TINY)
    assert f"tunemesh/tiny-dense: wrote revision {revision} (config.json, tokenizer.json, tokenizer_config.json)" in out
    assert f"HF_HOME={tmp_path / 'hf'} HF_HUB_OFFLINE=1" in out
    assert set(fake.auth) == {f"Bearer {API_KEY}"}
    assert sync(port, tmp_path / "hf") == 0
    again = capsys.readouterr().out
    assert f"tunemesh/tiny-dense: already had revision {revision}" in again and "wrote" not in again


def test_the_default_cache_is_hf_home(serve, tmp_path, monkeypatch, capsys):
    _, port = serve({"tunemesh/tiny-dense": TINY})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert sync(port, None) == 0
    assert snapshot_files(tmp_path / "home" / "hub", "tunemesh/tiny-dense") == TINY
    assert "HF_HOME=" not in capsys.readouterr().out  # already where Hugging Face looks


def test_model_option_picks_served_models_and_refuses_others(serve, tmp_path, capsys):
    _, port = serve({"tunemesh/tiny-dense": TINY, "Org/Other-1.5B": OTHER})
    assert sync(port, tmp_path / "hf", "--model", "Org/Other-1.5B") == 0
    assert [p.name for p in (tmp_path / "hf" / "hub").iterdir()] == ["models--Org--Other-1.5B"]
    assert sync(port, tmp_path / "hf2", "--model", "no/such") == 1
    err = capsys.readouterr().err
    assert "does not serve no/such (served: tunemesh/tiny-dense, Org/Other-1.5B)" in err
    assert not (tmp_path / "hf2").exists()


def test_a_bad_key_fails_with_the_reason_and_writes_nothing(serve, tmp_path, capsys):
    _, port = serve({"tunemesh/tiny-dense": TINY})
    assert sync(port, tmp_path / "hf", key="tml-wrong") == 1
    err = capsys.readouterr().err
    assert "refused GetCapabilities: UNAUTHENTICATED [BAD_API_KEY]: unknown or revoked API key" in err
    assert not (tmp_path / "hf").exists()


def test_no_key_is_a_usage_error(serve, tmp_path, capsys):
    _, port = serve({"tunemesh/tiny-dense": TINY})
    assert cli.main(["tokenizers", "sync", "--address", f"127.0.0.1:{port}", "--hf-home", str(tmp_path)]) == 1
    assert "no API key: pass --api-key" in capsys.readouterr().err


def test_an_unreachable_mesh_fails_with_the_address(serve, tmp_path, capsys):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert sync(port, tmp_path / "hf", "--timeout", "1") == 1
    err = capsys.readouterr().err
    assert f"cannot reach the mesh at 127.0.0.1:{port}: UNAVAILABLE" in err
    assert not (tmp_path / "hf").exists()


def test_one_models_failure_fails_the_command_but_not_the_others(serve, tmp_path, capsys):
    _, port = serve({"tunemesh/tiny-dense": TINY, "org/broken": (grpc.StatusCode.FAILED_PRECONDITION, "NO_TOKENIZER"),
                     "org/evil": [("../../escape", b"x"), ("tokenizer.json", b"{}")]})
    assert sync(port, tmp_path / "hf") == 1
    captured = capsys.readouterr()
    assert "tunemesh/tiny-dense: wrote" in captured.out
    assert "org/broken: FAILED_PRECONDITION [NO_TOKENIZER]" in captured.err
    assert "org/evil: refusing file name '../../escape'" in captured.err
    assert "2 of 3 model(s) not written" in captured.err
    assert sorted(p.name for p in (tmp_path / "hf" / "hub").iterdir()) == ["models--tunemesh--tiny-dense"]
    assert not (tmp_path / "escape").exists()


def test_models_without_a_hub_name_are_skipped(serve, tmp_path, capsys):
    _, port = serve({"tunemesh/tiny-dense": TINY, "local/a/b": OTHER})
    assert sync(port, tmp_path / "hf") == 0
    assert "skipped local/a/b: 'local/a/b' is not a Hugging Face model id" in capsys.readouterr().err
    assert sync(port, tmp_path / "hf", "--model", "local/a/b") == 1  # asked for by name: a failure


def test_no_served_models_is_a_failure(serve, tmp_path, capsys):
    _, port = serve({})
    assert sync(port, tmp_path / "hf") == 1
    assert "serves no models right now" in capsys.readouterr().err
