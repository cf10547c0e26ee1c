"""A writer SIGKILLed before commit leaves no visible checkpoint, and recover() cleans up."""

from __future__ import annotations

import os
import pathlib
import selectors
import signal
import subprocess
import sys

import pytest
from tunemesh_checkpoint.store import FilesystemStore
from tunemesh.errors import NotFoundError

CHILD = pathlib.Path(__file__).with_name("checkpoint_crash_child.py")
SERVICES = pathlib.Path(__file__).resolve().parents[3] / "services"
EARLIER = "alice/runs/3f2a/state/step-10"
KEY = "alice/runs/3f2a/state/step-20"
EARLIER_BYTES = bytes(range(256)) * 1000


def spawn_child(root: pathlib.Path, mode: str) -> subprocess.Popen:
    paths = [str(SERVICES / "checkpoint"), str(SERVICES / "common"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(root), KEY, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )


def wait_for_line(proc: subprocess.Popen, expected: str, timeout_s: float = 3.0) -> None:
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            proc.kill()
            pytest.fail(f"child did not print {expected!r} within {timeout_s}s")
    assert proc.stdout.readline().decode().strip() == expected


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=3) == -signal.SIGKILL
    proc.stdin.close()
    proc.stdout.close()


def read(store: FilesystemStore, key: str, name: str) -> bytes:
    return b"".join(store.read_blob(key, name, chunk_size=4096))


@pytest.mark.parametrize(
    ("mode", "ready_line"),
    [("mid-write", "WRITING"), ("before-commit", "BLOBS_WRITTEN")],
)
def test_writer_killed_before_commit_leaves_nothing_visible(tmp_path, mode, ready_line):
    root = tmp_path / "ckpt"
    store = FilesystemStore(root)
    with store.writer(EARLIER) as writer:
        writer.write_blob("adapter_model.safetensors", [EARLIER_BYTES[:1000], EARLIER_BYTES[1000:]])
        writer.commit({"step": 10})

    proc = spawn_child(root, mode)
    wait_for_line(proc, ready_line)
    kill(proc)

    leftovers = list((root / "staging").iterdir())
    assert len(leftovers) == 1
    assert (leftovers[0] / "adapter_model.safetensors").stat().st_size > 0
    assert [m.key for m in store.list("")] == [EARLIER]
    with pytest.raises(NotFoundError):
        store.manifest(KEY)

    fresh = FilesystemStore(root)
    assert fresh.recover() >= 1
    assert list((root / "staging").iterdir()) == []
    assert [m.key for m in fresh.list("alice")] == [EARLIER]
    assert fresh.manifest(EARLIER).metadata == {"step": 10}
    assert read(fresh, EARLIER, "adapter_model.safetensors") == EARLIER_BYTES

    with fresh.writer(KEY) as writer:
        writer.write_blob("adapter_model.safetensors", [b"retry"])
        writer.commit({"step": 20})
    assert [m.key for m in fresh.list("alice")] == [EARLIER, KEY]
    assert read(fresh, KEY, "adapter_model.safetensors") == b"retry"


def test_child_commits_when_not_killed(tmp_path):
    """The before-commit child really would publish: the kill is what prevents it."""
    root = tmp_path / "ckpt"
    proc = spawn_child(root, "before-commit")
    wait_for_line(proc, "BLOBS_WRITTEN")
    proc.stdin.write(b"commit\n")
    proc.stdin.close()
    assert proc.wait(timeout=3) == 0
    proc.stdout.close()

    store = FilesystemStore(root)
    assert store.manifest(KEY).metadata == {"from": "child"}
    assert read(store, KEY, "adapter_config.json") == b'{"r": 8}'
    assert store.recover() == 0
