"""A 2-rank trainer (`--ranks 2`) whose rank dies does not hang for the collective timeout:
rank 0 (its watchdog) exits at once when its worker dies, and the worker exits when rank 0
dies (its connection to rank 0 closes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunemesh_local import processes

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.e2e
RANK_LOST_EXIT = 3  # tunemesh_trainer.__main__.RANK_LOST_EXIT


def _start(tmp_path: Path, model_data_dir: Path) -> tuple[subprocess.Popen, int, Path]:
    ready, log = tmp_path / "trainer.ready.json", tmp_path / "trainer.log"
    argv = [sys.executable, "-m", "tunemesh_trainer", "--ranks", "2", "--num-threads", "1",
            "--model", "tunemesh/tiny-dense", "--data-dir", str(model_data_dir), "--ready-file", str(ready),
            "--insecure", "true"]
    trainer = processes.spawn(argv, log, env=processes.child_env({"HF_HUB_OFFLINE": "1"}))
    deadline = time.monotonic() + 180
    while not ready.exists():
        assert trainer.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    assert json.loads(ready.read_text())["pid"] == trainer.pid
    return trainer, _worker_of(trainer.pid), log


def _worker_of(parent: int) -> int:
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent \
                    and b"tunemesh_trainer.ranks" in (proc / "cmdline").read_bytes():
                return int(proc.name)
        except (OSError, ValueError):
            continue
    raise AssertionError(f"no rank worker under pid {parent}")


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.2)
    return False


def test_rank_0_exits_when_its_worker_dies(tmp_path, model_data_dir):
    trainer, worker, log = _start(tmp_path, model_data_dir)
    try:
        os.kill(worker, signal.SIGKILL)
        assert trainer.wait(timeout=30) == RANK_LOST_EXIT, log.read_text()[-3000:]
        assert "rank 1 exited with code -9" in log.read_text()
    finally:
        trainer.kill()


def test_worker_exits_when_rank_0_dies(tmp_path, model_data_dir):
    trainer, worker, log = _start(tmp_path, model_data_dir)
    trainer.kill()
    trainer.wait()
    assert _gone(worker, within_s=30), log.read_text()[-3000:]
