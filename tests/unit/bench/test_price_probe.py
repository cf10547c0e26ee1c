"""bench/price_probe.py: its /proc readers, on this test's own process (no mesh)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from bench_loader import bench_module


pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux /proc")


@pytest.fixture(scope="module")
def probe():
    with bench_module("price_probe") as module:
        yield module


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_threads_reads_each_thread_and_charges_work_to_the_thread_that_did_it(probe):
    ready, go, spun, done = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    ids = {}

    def busy():
        ids["tid"] = threading.get_native_id()
        ready.set()
        go.wait(10)
        _spin(0.3)
        spun.set()
        done.wait(10)  # alive while it is read

    worker = threading.Thread(target=busy)
    worker.start()
    assert ready.wait(10)
    before = probe.threads(os.getpid())
    go.set()
    assert spun.wait(30)
    after = probe.threads(os.getpid())
    done.set()
    worker.join()
    me = threading.get_native_id()
    assert ids["tid"] in before and me in before
    assert set(after[ids["tid"]]) == {"cpu_s", "sys_s", "voluntary", "involuntary"}
    grew, mine = probe.delta(after[ids["tid"]], before[ids["tid"]]), probe.delta(after[me], before[me])
    assert grew["cpu_s"] >= 0.2 > mine["cpu_s"]  # the spinning thread, not this waiting one, got the CPU
    assert grew["voluntary"] >= 0 and grew["involuntary"] >= 0


def test_cpu_seconds_of_the_process_is_at_least_its_main_thread(probe):
    process, _ = probe.cpu_seconds(f"/proc/{os.getpid()}/stat")
    thread, system = probe.cpu_seconds(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/stat")
    assert process >= thread >= system >= 0
