"""`tunemesh up | status | down` with a real etcd and stand-in services."""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import pytest

from tunemesh.errors import UnavailableError
from tunemesh_local import cli, launcher, processes, state
from tunemesh_local.launcher import MeshConfig, ServiceSpec
from tunemesh_local.state import MeshState, ProcessRecord

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd binary not installed"),
]
FAKE = str(Path(__file__).with_name("fake_service.py"))


def fake_services(scheduler_flags: tuple[str, ...] = (), seen: list | None = None) -> launcher.ServiceFactory:
    def factory(config: MeshConfig, etcd_endpoint: str, api_keys_file: Path) -> list[ServiceSpec]:
        if seen is not None:
            seen.append(etcd_endpoint)
        certs = config.certs()
        specs = [
            ServiceSpec(f"trainer-{i}", "trainer", (sys.executable, FAKE, "--listen", "127.0.0.1:0", "--ready-file",
                        str(config.ready_file(f"trainer-{i}")), "--etcd", etcd_endpoint, "--node-id", f"trainer-{i}",
                        *launcher.tls_flags(certs, f"trainer-{i}", "trainer", f"trainer-{i}")))
            for i in range(config.trainers)
        ]
        specs.append(ServiceSpec("scheduler", "scheduler", (sys.executable, FAKE, "--listen", "127.0.0.1:0",
                                 "--ready-file", str(config.ready_file("scheduler")), *scheduler_flags,
                                 *launcher.tls_flags(certs, "scheduler", "scheduler"))))
        return specs

    return factory


def _run(capsys: pytest.CaptureFixture, argv: list[str], **kwargs) -> tuple[int, str, str]:
    code = cli.main(argv, **kwargs)
    out, err = capsys.readouterr()
    return code, out, err


def _place(mesh: MeshState, runs: dict[str, str]) -> None:
    """Place runs as the scheduler would (here as etcd's root: the mesh's admin certificate)."""
    import asyncio

    from tunemesh_common.membership import registry
    from tunemesh_local.status import admin_tls

    async def place() -> None:
        async with registry.connect(mesh.etcd_endpoint, tls=admin_tls(mesh)) as client:
            for run, node in runs.items():
                await registry.PlacementTable(client).place_run(run, node)

    asyncio.run(place())


@pytest.mark.parametrize("insecure", [False, True], ids=["tls", "insecure"])
def test_up_status_down(tmp_path: Path, capsys: pytest.CaptureFixture, insecure: bool) -> None:
    d = ["--state-dir", str(tmp_path)]
    code, out, _ = _run(capsys, ["up", "--trainers", "2", *d, *(["--insecure"] if insecure else [])],
                        services=fake_services())
    assert code == 0
    mesh = state.load(tmp_path)
    assert [p.name for p in mesh.processes] == ["etcd", "trainer-0", "trainer-1", "scheduler"]
    assert f"export TUNEMESH_ADDRESS={mesh.scheduler_address}" in out
    if insecure:
        assert not mesh.ca_file and "--insecure" in " ".join(mesh.processes[1].argv)
    else:  # a CA in the state dir, clients told where; etcd reachable only with a certificate
        assert f"export TUNEMESH_CA_BUNDLE={tmp_path.resolve() / 'tls' / 'ca.pem'}" in out
        assert "--tls-cert" in mesh.processes[1].argv and "--client-cert-auth" in mesh.processes[0].argv
    _place(mesh, {"run-trainer-0": "trainer-0", "run-trainer-1": "trainer-1"})
    alice_key = launcher.client_keys(mesh)["alice"]
    assert f"export TUNEMESH_API_KEY={alice_key}" in out and alice_key.startswith("tml-")
    host, port = mesh.scheduler_address.rsplit(":", 1)
    socket.create_connection((host, int(port)), timeout=2).close()  # really listening

    code, _, err = _run(capsys, ["up", *d], services=fake_services())
    assert code == 1 and "still running" in err and "tunemesh down" in err

    code, out, _ = _run(capsys, ["status", "--json", *d])
    view = json.loads(out)
    assert code == 0 and view["etcd"]["reachable"]
    assert all(p["alive"] for p in view["processes"])
    assert sorted((t["node_id"], t["models"][0]) for t in view["trainers"]) == [
        ("trainer-0", "tiny"), ("trainer-1", "tiny")]
    assert view["placements"] == {"run-trainer-0": "trainer-0", "run-trainer-1": "trainer-1"}
    code, out, _ = _run(capsys, ["status", *d])
    assert "run-trainer-1  trainer-1" in out and "1/4" in out

    code, out, _ = _run(capsys, ["down", "--grace", "5", *d])
    assert code == 0 and "stopped 4" in out
    assert not any(processes.is_alive(p.pid, p.start_time) for p in mesh.processes)
    assert state.load(tmp_path) is None
    code, _, err = _run(capsys, ["status", *d])
    assert code == 1 and "no mesh recorded" in err


def test_failed_service_stops_everything_and_shows_its_log(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    done = ProcessRecord("old", "trainer", 2**22 + 7, None, "/nowhere")  # a stale record: pid not alive
    state.save(MeshState(str(tmp_path), "127.0.0.1:1", "", [done]))
    seen: list[str] = []
    code, _, err = _run(capsys, ["up", "--state-dir", str(tmp_path)],
                        services=fake_services(("--exit-code", "3"), seen))
    assert code == 1
    assert "scheduler exited with code 3" in err and "failing on purpose" in err
    assert state.load(tmp_path) is None
    host, port = seen[0].rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):  # etcd was stopped too
        socket.create_connection((host, int(port)), timeout=2).close()
    trainer_pid = json.loads((tmp_path / "run" / "trainer-0.ready.json").read_text())["pid"]
    assert not processes.is_alive(trainer_pid)


def test_never_ready_service_times_out(tmp_path: Path) -> None:
    config = MeshConfig(state_dir=tmp_path, trainers=1, ready_timeout=2.0)
    with pytest.raises(UnavailableError, match="scheduler not ready after 2s"):
        launcher.up(config, fake_services(("--never-ready",)))
    assert state.load(tmp_path) is None
