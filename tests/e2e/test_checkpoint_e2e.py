"""Checkpoints with real processes: SIGKILL of the checkpoint service mid-write, and a
state checkpoint that survives a whole mesh restart and resumes training exactly."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

import tunemesh
from tunemesh_internal.v1 import checkpoint_pb2, checkpoint_pb2_grpc
from tunemesh.v1 import checkpoints_pb2, types_pb2
from tunemesh_checkpoint.store import FilesystemStore
from tunemesh_common.service.rpc import TENANT_KEY

TENANT = ((TENANT_KEY, "alice"),)
ENV = {**os.environ, "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}


class CheckpointProcess:
    """`python -m tunemesh_checkpoint` on a root directory."""

    def __init__(self, root: Path, run_dir: Path) -> None:
        self.root, self.run_dir = root, run_dir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> str:
        self.starts += 1
        ready = self.run_dir / f"ready-{self.starts}.json"
        self.log = self.run_dir / f"checkpoint-{self.starts}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tunemesh_checkpoint", "--listen", "127.0.0.1:0", "--root-dir", str(self.root),
             "--ready-file", str(ready), "--insecure", "true"], stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=ENV)
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        return json.loads(ready.read_text())["address"]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _requests(path: str, files: dict[str, bytes], pause_after: int | None = None, resume=None):
    yield checkpoint_pb2.WriteCheckpointRequest(header=checkpoint_pb2.WriteCheckpointHeader(
        path=path, base_model="tunemesh/tiny-dense", lora_config=types_pb2.LoraConfig(rank=4, alpha=4, train_attn=True)))
    sent = 0
    for name, data in files.items():
        for offset in range(0, len(data), 1 << 16):
            if pause_after is not None and sent == pause_after:
                resume.wait(30)
                return
            chunk = checkpoints_pb2.FileChunk(file_name=name, offset=offset, data=data[offset:offset + (1 << 16)])
            yield checkpoint_pb2.WriteCheckpointRequest(chunk=chunk)
            sent += 1


def _files(seed: int) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {"adapter_config.json": b'{"peft_type": "LORA"}', "adapter_model.safetensors": rng.bytes(3 << 20)}


def _read(stub, path: str) -> dict[str, bytes]:
    files: dict[str, bytearray] = {}
    for part in stub.ReadCheckpoint(checkpoint_pb2.ReadCheckpointRequest(path=path), metadata=TENANT, timeout=30):
        if part.WhichOneof("part") == "chunk":
            files.setdefault(part.chunk.file_name, bytearray()).extend(part.chunk.data)
    return {k: bytes(v) for k, v in files.items()}


def test_sigkill_mid_write_never_shows_and_the_service_recovers(tmp_path: Path) -> None:
    service = CheckpointProcess(tmp_path / "root", tmp_path)
    try:
        stub = checkpoint_pb2_grpc.CheckpointStorageServiceStub(grpc.insecure_channel(service.start()))
        kept = "tunemesh://runs/r1/sampler/kept"
        stub.WriteCheckpoint(_requests(kept, _files(1)), metadata=TENANT, timeout=30)

        torn = "tunemesh://runs/r1/sampler/torn"
        resume = threading.Event()
        call = stub.WriteCheckpoint.future(_requests(torn, _files(2), pause_after=20, resume=resume),
                                           metadata=TENANT, timeout=60)
        staging = tmp_path / "root" / "staging"
        deadline = time.monotonic() + 20
        while not any(p.is_file() for p in staging.rglob("*")):  # the first file is on disk
            assert time.monotonic() < deadline, "the write never reached the store"
            time.sleep(0.02)
        service.kill()
        resume.set()
        with pytest.raises(grpc.RpcError):
            call.result()

        keys = [m.key for m in FilesystemStore(tmp_path / "root").list("")]
        assert keys == ["alice/runs/r1/sampler/kept"]  # the torn write is not listed
        stub = checkpoint_pb2_grpc.CheckpointStorageServiceStub(grpc.insecure_channel(service.start()))
        assert "1 interrupted writes cleaned up" in service.log.read_text()
        assert not any(staging.iterdir())
        assert _read(stub, kept) == _files(1)
        stub.WriteCheckpoint(_requests(torn, _files(3)), metadata=TENANT, timeout=30)
        got = _read(stub, torn)
        assert hashlib.sha256(got["adapter_model.safetensors"]).digest() == hashlib.sha256(
            _files(3)["adapter_model.safetensors"]).digest()
    finally:
        service.stop()


def _datum(seed: int) -> tunemesh.Datum:
    tokens = list(np.random.default_rng(seed).integers(5, 900, 17))
    return tunemesh.Datum(tunemesh.ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:]})


def _train(trainer: tunemesh.TrainingClient, steps: range) -> list[float]:
    futures = []
    for step in steps:
        futures.append(trainer.forward_backward([_datum(step)], "cross_entropy"))
        trainer.optim_step(tunemesh.AdamParams(learning_rate=2e-2))
    return [f.result(timeout=120).metrics["loss:sum"] for f in futures]


def _store_ops(mesh) -> dict[str, int]:
    """How many files the checkpoint service took by rename and by stream (its metrics)."""
    (checkpoint,) = mesh.by_role("checkpoint")
    text = urllib.request.urlopen(checkpoint.metrics_url, timeout=10).read().decode()
    counts = {}
    for op in ("adopt_file", "write_file"):
        found = re.search(r'^tunemesh_checkpoint_op_duration_seconds_count\{[^}]*op="%s"[^}]*\} (\S+)$' % op, text, re.M)
        counts[op] = int(float(found.group(1))) if found else 0
    return counts


def test_state_survives_a_mesh_restart_and_resumes_exactly(start_mesh, tmp_path: Path) -> None:
    state_dir = tmp_path / "mesh"
    with start_mesh(state_dir) as mesh:
        with tunemesh.ServiceClient(mesh.scheduler_address, "tml-demo-alice") as alice:
            trainer = alice.create_lora_training_client("tunemesh/tiny-dense", rank=4, seed=2)
            _train(trainer, range(2))
            path = trainer.save_state("step-2").result(timeout=120).path
            expected = _train(trainer, range(2, 4))
        # every process on one host: the trainer handed its files over by rename, streamed none
        assert _store_ops(mesh) == {"adopt_file": 3, "write_file": 0}
        assert list((state_dir / "checkpoints" / "handoff").iterdir()) == []
        cli = [sys.executable, "-m", "tunemesh_local.cli", "checkpoints", "list", "--address",
               mesh.scheduler_address, "--api-key", "tml-demo-alice", "--state-dir", str(state_dir)]
        plain_env = {k: v for k, v in ENV.items() if k != "TUNEMESH_CA_BUNDLE"}  # the CLI finds the mesh's CA
        listing = subprocess.run(cli, capture_output=True, text=True, timeout=60, env=plain_env)
        assert listing.returncode == 0 and path in listing.stdout, listing.stderr
        download = cli[:4] + ["download", path, str(tmp_path / "dl")] + cli[5:]
        done = subprocess.run(download, capture_output=True, text=True, timeout=60, env=plain_env)
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors"]

    with start_mesh(state_dir) as mesh:  # same state dir: same checkpoint store
        with tunemesh.ServiceClient(mesh.scheduler_address, "tml-demo-alice") as alice:
            resumed = alice.create_training_client_from_state_with_optimizer(path)
            assert _train(resumed, range(2, 4)) == expected
        with tunemesh.ServiceClient(mesh.scheduler_address, "tml-demo-bob") as bob:
            with pytest.raises(tunemesh.NotFoundError):
                bob.create_training_client_from_state(path)
