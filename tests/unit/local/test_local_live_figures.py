"""`tunemesh status` live figures: read from real exposition text, a clear "-" where a
process's metrics cannot be read, and how they render."""

from __future__ import annotations

import socket

import prometheus_client
from prometheus_client import CollectorRegistry

from tunemesh_scheduler.metrics import SchedulerMetrics
from tunemesh_trainer.metrics import TrainerMetrics
from tunemesh_local import live_figures, status
from tunemesh_local.state import ProcessRecord


def _scheduler_text() -> str:
    registry = CollectorRegistry()
    snapshot = {"queued_by_tenant": {"alice": 2, "bob": 1, "carol": 0}, "operations_by_state": {}, "nodes": {},
                "runs": 3, "sessions_open": 2}
    SchedulerMetrics(registry).follow(lambda: snapshot, lambda: {})
    return prometheus_client.generate_latest(registry).decode()


def _trainer_text() -> str:
    registry = CollectorRegistry()
    trainer = TrainerMetrics(registry)
    trainer.follow(lambda: 2, 64)
    trainer.step(1.0, {"forward_backward": 600}, {"forward_backward": 1})
    return prometheus_client.generate_latest(registry).decode()


def test_scheduler_figures_are_the_queue_depth_per_tenant():
    figures = live_figures.figures("scheduler", _scheduler_text())
    assert figures == {"queued": 3, "queued_by_tenant": {"alice": 2, "bob": 1, "carol": 0}}


def test_trainer_figures_are_tokens_per_second_and_adapters():
    assert live_figures.figures("trainer", _trainer_text()) == {
        "tokens_per_second": 10.0, "adapters": 2, "adapter_slots": 64}


def test_missing_metrics_read_as_none():
    assert live_figures.figures("sampler", "") == {"tokens_per_second": None, "adapters": None, "adapter_slots": None}
    assert live_figures.figures("scheduler", "")["queued"] is None


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_collect_scrapes_each_process_and_marks_the_unreachable_and_the_disabled():
    registry = CollectorRegistry()
    TrainerMetrics(registry).follow(lambda: 1, 8)
    server, thread = prometheus_client.start_http_server(0, "127.0.0.1", registry)
    try:
        live = live_figures.collect([
            ProcessRecord("etcd", "etcd", 1, None, "l"),
            ProcessRecord("trainer-0", "trainer", 2, None, "l",
                          metrics_url=f"http://127.0.0.1:{server.server_port}/metrics"),
            ProcessRecord("trainer-1", "trainer", 3, None, "l", metrics_url=f"http://127.0.0.1:{_closed_port()}/metrics"),
            ProcessRecord("sampler-0", "sampler", 4, None, "l"),
        ], timeout=2)
    finally:
        server.shutdown()
        thread.join()
    assert live == {
        "trainer-0": {"metrics": "ok", "tokens_per_second": 0.0, "adapters": 1, "adapter_slots": 8},
        "trainer-1": {"metrics": "unreachable"},
        "sampler-0": {"metrics": "off"},
    }


def test_render_shows_live_figures_and_dashes_where_unknown():
    view = {
        "state_dir": "/s", "scheduler_address": "127.0.0.1:1", "etcd_endpoint": "127.0.0.1:2",
        "etcd": {"reachable": True, "error": ""}, "api_keys_file": "/k", "prometheus_url": "http://127.0.0.1:9",
        "processes": [], "trainers": [], "placements": {},
        "live": {
            "scheduler": {"metrics": "ok", **live_figures.figures("scheduler", _scheduler_text())},
            "trainer-0": {"metrics": "ok", **live_figures.figures("trainer", _trainer_text())},
            "sampler-0": {"metrics": "unreachable"},
        },
    }
    lines = status.render_status(view).splitlines()
    assert "prometheus  http://127.0.0.1:9" in lines
    rows = {line.split()[0]: line.split(None, 1)[1] for line in lines if line.startswith(("scheduler ", "trainer-0", "sampler-0"))}
    assert rows["scheduler"].split() == ["3", "(alice", "2,", "bob", "1)", "-", "-", "ok"]
    assert rows["trainer-0"].split() == ["-", "10.0", "2/64", "ok"]
    assert rows["sampler-0"].split() == ["-", "-", "-", "unreachable"]


def test_render_says_which_scheduler_replica_leads():
    view = {
        "state_dir": "/s", "scheduler_address": "127.0.0.1:1,127.0.0.1:3", "etcd_endpoint": "127.0.0.1:2",
        "etcd": {"reachable": True, "error": ""}, "api_keys_file": "/k", "trainers": [], "placements": {},
        "scheduler_leader": "127.0.0.1:3", "live": {},
        "processes": [
            {"name": "scheduler", "role": "scheduler", "pid": 10, "alive": True, "address": "127.0.0.1:1"},
            {"name": "scheduler-1", "role": "scheduler", "pid": 11, "alive": True, "address": "127.0.0.1:3"},
            {"name": "trainer-0", "role": "trainer", "pid": 12, "alive": False, "address": "127.0.0.1:4"},
        ],
    }
    rows = {line.split()[0]: line.split()[2:] for line in status.render_status(view).splitlines()
            if line.startswith(("scheduler", "trainer-0 "))}
    assert rows["scheduler"][:2] == ["up", "(standby)"]
    assert rows["scheduler-1"][:2] == ["up", "(leader)"]
    assert rows["trainer-0"][0] == "DEAD"
