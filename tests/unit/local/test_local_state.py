"""State file, API keys, argument parsing and service commands of the local launcher."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunemesh.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError
from tunemesh_common.service import api_keys
from tunemesh_local import cli, keys, launcher, processes, state
from tunemesh_local.launcher import MeshConfig
from tunemesh_local.state import MeshState, ProcessRecord


def _mesh(tmp_path: Path) -> MeshState:
    records = [ProcessRecord("etcd", "etcd", 11, 123, "/l/etcd.log", address="127.0.0.1:2379"),
               ProcessRecord("scheduler", "scheduler", 12, None, "/l/s.log", "127.0.0.1:5000", "http://m")]
    return MeshState(str(tmp_path), "127.0.0.1:2379", str(tmp_path / "keys.json"), records, "127.0.0.1:5000")


def test_state_round_trips_and_is_removed(tmp_path: Path) -> None:
    mesh = _mesh(tmp_path)
    path = state.save(mesh)
    assert path == tmp_path / "mesh.json"
    assert json.loads(path.read_text())["processes"][1]["metrics_url"] == "http://m"
    assert state.load(tmp_path) == mesh
    assert [p.name for p in state.load(tmp_path).by_role("scheduler")] == ["scheduler"]
    state.remove(tmp_path)
    assert state.load(tmp_path) is None
    state.remove(tmp_path)  # idempotent


def test_corrupt_state_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "mesh.json").write_text("{not json")
    with pytest.raises(FailedPreconditionError, match="mesh.json"):
        state.load(tmp_path)
    (tmp_path / "mesh.json").write_text('{"state_dir": "x"}')
    with pytest.raises(FailedPreconditionError, match="unexpected layout"):
        state.load(tmp_path)


def test_default_state_dir_prefers_env(tmp_path: Path) -> None:
    assert state.default_state_dir({"TUNEMESH_STATE_DIR": str(tmp_path)}) == tmp_path
    assert state.default_state_dir({}) == Path.home() / ".tunemesh" / "local"


def test_arg_parsing() -> None:
    args = cli.build_parser().parse_args(["up", "--trainers", "3", "--models", "a", "b", "--state-dir", "/x"])
    assert (args.command, args.trainers, args.models, args.state_dir) == ("up", 3, ["a", "b"], Path("/x"))
    assert args.api_keys_file is None
    assert cli.build_parser().parse_args(["status", "--json"]).json is True
    assert cli.build_parser().parse_args(["down", "--grace", "2"]).grace == 2.0
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([])


def test_default_services_follow_the_contract(tmp_path: Path) -> None:
    config = MeshConfig(state_dir=tmp_path, trainers=3, models=("m1", "m2"))
    specs = launcher.default_services(config, "127.0.0.1:2379", tmp_path / "keys.json")
    assert [(s.name, s.role) for s in specs] == [("checkpoint", "checkpoint"),
        ("trainer-0", "trainer"), ("trainer-1", "trainer"), ("trainer-2", "trainer"), ("sampler-0", "sampler"),
        ("scheduler", "scheduler"), ("scheduler-1", "scheduler"),  # a leader and a standby by default
        ("gateway", "gateway")]
    ckpt = list(specs[0].argv)
    assert ckpt[ckpt.index("--root-dir") + 1] == str(tmp_path / "checkpoints")
    address = ckpt[ckpt.index("--listen") + 1]
    t2 = list(specs[3].argv)
    assert t2[t2.index("--checkpoint") + 1] == address
    assert t2[1:3] == ["-m", "tunemesh_trainer"]
    assert t2[t2.index("--model") + 1] == "m1"  # round-robin
    assert t2[t2.index("--node-id") + 1] == "trainer-2"
    assert t2[t2.index("--ready-file") + 1] == str(config.ready_file("trainer-2"))
    sampler = list(specs[4].argv)
    assert sampler[sampler.index("--checkpoint") + 1] == address
    assert sampler[sampler.index("--model") + 1] == "m1"
    sched = list(specs[5].argv)
    assert sched[sched.index("--checkpoint") + 1] == address
    assert sched[sched.index("--api-keys-file") + 1] == str(tmp_path / "keys.json")
    assert sched[sched.index("--etcd") + 1] == "127.0.0.1:2379"
    standby = list(specs[6].argv)
    assert standby[standby.index("--listen") + 1] != sched[sched.index("--listen") + 1]  # fixed, distinct ports
    assert not sched[sched.index("--listen") + 1].endswith(":0")
    single = launcher.default_services(MeshConfig(state_dir=tmp_path, schedulers=1, gateway=False), "e:1",
                                       tmp_path / "k")
    (alone,) = [s for s in single if s.role == "scheduler"]
    assert alone.argv[alone.argv.index("--listen") + 1] == "127.0.0.1:0"  # one replica, no gateway: any free port
    assert "gateway" not in {s.role for s in single}
    no_models = launcher.default_services(MeshConfig(state_dir=tmp_path), "e:1", tmp_path / "k")
    assert "--model" not in no_models[1].argv
    no_samplers = launcher.default_services(MeshConfig(state_dir=tmp_path, samplers=0), "e:1", tmp_path / "k")
    assert "sampler" not in {s.role for s in no_samplers}


def test_more_models_than_trainers_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="trainers"):
        launcher.up(MeshConfig(state_dir=tmp_path, trainers=1, models=("a", "b")))
    assert state.load(tmp_path) is None


def test_up_makes_fresh_hashed_keys_once_per_state_dir(tmp_path: Path) -> None:
    path = launcher.ensure_api_keys(MeshConfig(state_dir=tmp_path))
    clients = keys.client_keys(tmp_path)
    assert sorted(clients) == ["alice", "bob"] and all(k.startswith("tml-") for k in clients.values())
    records = api_keys.read_key_file(path)
    assert sorted(r.tenant for r in records) == ["alice", "bob"]
    assert all(key not in path.read_text() for key in clients.values())  # hashes only
    assert all(r.matches(clients[r.tenant]) for r in records)
    assert path.stat().st_mode & 0o077 == 0 and (tmp_path / "client_keys.json").stat().st_mode & 0o077 == 0
    # a restart keeps them; a new tenant gets one; another state dir gets other keys
    launcher.ensure_api_keys(MeshConfig(state_dir=tmp_path, tenants=("alice", "bob", "carol")))
    assert {t: k for t, k in keys.client_keys(tmp_path).items() if t != "carol"} == clients
    assert len(api_keys.read_key_file(path)) == 3
    launcher.ensure_api_keys(MeshConfig(state_dir=tmp_path / "other"))
    assert set(keys.client_keys(tmp_path / "other").values()).isdisjoint(clients.values())


def test_old_demo_keys_are_replaced_and_a_plain_text_keys_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "api_keys.json").write_text(json.dumps({"tml-demo-alice": "alice", "tml-demo-bob": "bob"}))
    path = launcher.ensure_api_keys(MeshConfig(state_dir=tmp_path))
    assert "tml-demo" not in path.read_text() and len(api_keys.read_key_file(path)) == 2
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"my-key": "acme"}))
    with pytest.raises(InvalidArgumentError, match="plain-text keys"):
        launcher.ensure_api_keys(MeshConfig(state_dir=tmp_path, api_keys_file=plain))
    bad = tmp_path / "bad.json"
    bad.write_text('["not", "a", "map"]')
    with pytest.raises(InvalidArgumentError, match="version"):
        launcher.ensure_api_keys(MeshConfig(state_dir=tmp_path, api_keys_file=bad))


def test_dev_keys_reach_the_schedulers_only_with_the_insecure_flag(tmp_path: Path) -> None:
    plain = launcher.default_services(MeshConfig(state_dir=tmp_path), "127.0.0.1:1", tmp_path / "k.json")
    dev = launcher.default_services(MeshConfig(state_dir=tmp_path, insecure_dev_keys={"k1": "t1", "k2": "t2"}),
                                    "127.0.0.1:1", tmp_path / "k.json")
    for spec in plain:
        assert "--api-keys" not in spec.argv and "--insecure-dev-keys" not in spec.argv
    schedulers = [s.argv for s in dev if s.role == "scheduler"]
    assert schedulers and all(a[a.index("--api-keys") + 1] == "k1=t1,k2=t2" and "--insecure-dev-keys" in a
                              for a in schedulers)


def test_wait_ready_reports_exit_with_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    proc = processes.spawn([sys.executable, "-c", "print('boom: no model'); raise SystemExit(3)"], log)
    with pytest.raises(UnavailableError, match="(?s)exited with code 3.*boom: no model"):
        processes.wait_ready("svc", proc, tmp_path / "never.json", log, timeout=10)


def test_terminate_escalates_to_sigkill(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    proc = processes.spawn([sys.executable, "-c", code], tmp_path / "stubborn.log")
    while "up" not in (tmp_path / "stubborn.log").read_text():
        time.sleep(0.02)
    started = processes.start_time(proc.pid)
    assert processes.is_alive(proc.pid, started)
    assert not processes.is_alive(proc.pid, started + 1)  # a reused pid is not ours
    t0 = time.monotonic()
    processes.terminate([(proc.pid, started)], grace=0.5)
    assert 0.4 < time.monotonic() - t0 < 5  # SIGTERM was ignored, so only SIGKILL ended it
    assert not processes.is_alive(proc.pid)


def test_child_env_exempts_loopback_from_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("no_proxy", "corp.example")
    env = processes.child_env()
    assert env["no_proxy"] == "corp.example,127.0.0.1,localhost"
    assert "127.0.0.1" in env["NO_PROXY"]
    out = subprocess.run([sys.executable, "-c", "import os; print(os.environ['no_proxy'])"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "corp.example,127.0.0.1,localhost"


def test_child_env_drops_an_enclosing_process_groups_rank_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "41045", "MASTER_ADDR": "127.0.0.1",
                        "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "x", "TUNEMESH_KEEP": "1"}.items():
        monkeypatch.setenv(name, value)
    env = processes.child_env()
    assert not {"RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"} & set(env)
    assert env["TUNEMESH_KEEP"] == "1"


def test_child_env_lets_openmp_threads_sleep_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert processes.child_env()["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert processes.child_env()["OMP_WAIT_POLICY"] == "ACTIVE"


def test_local_trainer_threads_split_the_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNEMESH_TRAINER_NUM_THREADS", raising=False)
    monkeypatch.setattr(launcher.os, "cpu_count", lambda: 8)
    assert [launcher.local_trainer_threads(n) for n in (1, 2, 3, 10)] == [7, 3, 2, 1]
    monkeypatch.setattr(launcher.os, "cpu_count", lambda: 2)
    argv = list(launcher.default_services(MeshConfig(state_dir=tmp_path), "e:1", tmp_path / "k")[1].argv)
    assert argv[argv.index("--num-threads") + 1] == "2"
    monkeypatch.setenv("TUNEMESH_TRAINER_NUM_THREADS", "2")  # the trainer reads it itself
    argv = list(launcher.default_services(MeshConfig(state_dir=tmp_path), "e:1", tmp_path / "k")[1].argv)
    assert "--num-threads" not in argv
