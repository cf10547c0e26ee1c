"""Forming a rank group's processes: the environment of each rank, the worker entry point,
the watchdog that reports a lost worker (no process group is formed here)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading

from tunemesh_trainer import ranks


def test_each_local_rank_gets_its_place_in_the_group(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    env = ranks.rank_env(2, 4, 29500, threads=3)
    assert env == {"RANK": "2", "LOCAL_RANK": "2", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": "29500", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "3",
                   ranks.TIMEOUT_ENV: "600.0"}


def test_a_launched_rank_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ranks.launched_rank() is None
    monkeypatch.setenv("RANK", "1")
    assert ranks.launched_rank() is None  # RANK alone is not a launcher's group
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ranks.launched_rank() == 1


def test_workers_run_the_trainer_level_module():
    assert importlib.util.find_spec(ranks.WORKER_MODULE) is not None
    assert not ranks.WORKER_MODULE.startswith("tunemesh_trainer.engine")


def test_the_watchdog_reports_the_first_worker_that_exits():
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dies = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    lost: list[tuple[int, int]] = []
    closing = threading.Event()
    try:
        watchdog = threading.Thread(target=ranks._watch_workers, args=([alive, dies], closing, lambda *a: lost.append(a)))
        watchdog.start()
        watchdog.join(timeout=20)
        assert not watchdog.is_alive() and lost == [(2, 7)]  # workers are ranks 1, 2, ...
    finally:
        closing.set()
        alive.kill()
        alive.wait()


IDLE_GROUP = """
import sys, time
from tunemesh_trainer import ranks
from tunemesh_trainer.engine.rank_group import RankCall
with ranks.local_group(2, threads=1, timeout_s=4.0) as group:
    time.sleep(10)  # idle for more than twice the collective timeout
    group.call(0, RankCall.DROP, ())  # every rank answers: none timed out waiting
print("alive")
"""


def test_an_idle_group_keeps_its_ranks_past_the_collective_timeout():
    done = subprocess.run([sys.executable, "-c", IDLE_GROUP], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("alive"), done.stderr[-3000:]
