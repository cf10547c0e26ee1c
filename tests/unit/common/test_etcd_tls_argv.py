"""etcd's command line with and without TLS, and what `etcd_auth` checks before it dials."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunemesh_common.membership import etcd_auth, registry
from tunemesh_common.membership.etcd_process import EtcdTlsFiles, etcd_argv, health_endpoint
from tunemesh_common.security import tls
from tunemesh_common.security.pki import Authority

TLS_FLAGS = ("--cert-file", "--key-file", "--trusted-ca-file", "--client-cert-auth")
FILES = EtcdTlsFiles(ca=Path("/pki/ca.pem"), cert=Path("/pki/etcd.pem"), key=Path("/pki/etcd-key.pem"))


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_plaintext_argv_has_http_urls_and_no_tls_or_metrics_flags() -> None:
    argv = etcd_argv(Path("/data"), 2379, 2380)
    assert _flag(argv, "--listen-client-urls") == _flag(argv, "--advertise-client-urls") == "http://127.0.0.1:2379"
    assert _flag(argv, "--listen-peer-urls") == "http://127.0.0.1:2380"
    assert not set(TLS_FLAGS) & set(argv)
    assert "--listen-metrics-urls" not in argv
    assert health_endpoint(argv) == "127.0.0.1:2379"


def test_tls_argv_serves_https_with_client_certs_and_plaintext_health_on_the_metrics_port() -> None:
    argv = etcd_argv(Path("/data"), 2379, 2380, tls=FILES, metrics_port=2381)
    assert _flag(argv, "--listen-client-urls") == _flag(argv, "--advertise-client-urls") == "https://127.0.0.1:2379"
    assert (_flag(argv, "--cert-file"), _flag(argv, "--key-file"), _flag(argv, "--trusted-ca-file")) == (
        "/pki/etcd.pem", "/pki/etcd-key.pem", "/pki/ca.pem")
    assert "--client-cert-auth" in argv
    assert _flag(argv, "--listen-peer-urls") == "http://127.0.0.1:2380"  # one member: no peer traffic
    assert _flag(argv, "--listen-metrics-urls") == "http://127.0.0.1:2381"
    assert health_endpoint(argv) == "127.0.0.1:2381"


def test_tls_without_a_metrics_port_is_refused() -> None:
    with pytest.raises(ValueError, match="metrics_port"):
        etcd_argv(Path("/data"), 2379, 2380, tls=FILES)
    argv = etcd_argv(Path("/data"), 2379, 2380, tls=FILES, metrics_port=1)
    cut = argv.index("--listen-metrics-urls")
    with pytest.raises(ValueError, match="no plaintext /health"):
        health_endpoint(argv[:cut] + argv[cut + 2:])


def test_every_mesh_role_has_an_etcd_user_and_nodes_only_their_own_records() -> None:
    from tunemesh_gateway.etcd_store import PREFIX as GATEWAY_TABLES

    assert set(etcd_auth.ACCESS) == {"scheduler", "trainer", "sampler", "checkpoint", "gateway"}
    assert etcd_auth.ACCESS["trainer"] == (registry.node_prefix("trainers"),)
    assert etcd_auth.ACCESS["sampler"] == (registry.node_prefix("samplers"),)
    assert etcd_auth.ACCESS["scheduler"] == (b"/tunemesh/",)
    assert etcd_auth.ACCESS["checkpoint"] == ()
    assert etcd_auth.ACCESS["gateway"] == (b"/tunemesh/gateway/",) == (GATEWAY_TABLES.encode(),)  # its store's keys


def _write_client(tmp_path: Path, role: str) -> list[str]:
    ca = Authority.create()
    ca.write(tmp_path)
    cert, key = ca.issue(tls.etcd_user(role), [tls.identity_name(role)]).write(tmp_path, role)
    return ["--tls-ca", str(tmp_path / "ca.pem"), "--tls-cert", str(cert), "--tls-key", str(key)]


def test_cli_refuses_a_certificate_that_is_not_roots_in_one_line(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        etcd_auth.main(["--endpoint", "127.0.0.1:1", "--wait-s", "0", *_write_client(tmp_path, "scheduler")])
    assert exited.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "NOT_ETCD_ROOT" in err and "'tunemesh-scheduler'" in err and len(err.splitlines()) == 1


def test_cli_names_a_missing_file_in_one_line(tmp_path: Path, capsys) -> None:
    args = _write_client(tmp_path, "admin")
    args[args.index("--tls-key") + 1] = str(tmp_path / "missing-key.pem")
    with pytest.raises(SystemExit) as exited:
        etcd_auth.main(["--endpoint", "127.0.0.1:1", *args])
    assert exited.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "missing-key.pem" in err and len(err.splitlines()) == 1
