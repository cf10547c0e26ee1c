"""The Tinker gateway as a service of `tunemesh up`: its command line (upstreams, TLS, etcd,
ready file, metrics), its certificate, `--no-gateway`, what `up` and `status` tell the user,
and Prometheus scraping it."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from tunemesh_common.security import tls as mesh_tls
from tunemesh_local import cli, launcher, prometheus, status
from tunemesh_local.launcher import MeshConfig
from tunemesh_local.state import MeshState, ProcessRecord


def _specs(config: MeshConfig) -> dict[str, list[str]]:
    return {s.name: list(s.argv) for s in launcher.default_services(config, "127.0.0.1:2379", config.state_dir / "k")}


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_the_gateway_is_told_every_scheduler_replica_etcd_and_its_files(tmp_path: Path) -> None:
    for replicas in (1, 3):
        specs = _specs(MeshConfig(state_dir=tmp_path, schedulers=replicas))
        gateway = specs["gateway"]
        assert gateway[1:3] == ["-m", "tunemesh_gateway"]
        listens = [_flag(argv, "--listen") for name, argv in specs.items() if name.startswith("scheduler")]
        assert len(listens) == replicas and not any(address.endswith(":0") for address in listens)
        assert _flag(gateway, "--scheduler") == ",".join(listens)  # fixed ports, known before they start
        assert _flag(gateway, "--etcd") == "127.0.0.1:2379"  # durable tables
        assert _flag(gateway, "--ready-file") == str(MeshConfig(state_dir=tmp_path).ready_file("gateway"))
        assert _flag(gateway, "--listen") == _flag(gateway, "--metrics-listen") == "127.0.0.1:0"
        # the schedulers' keys file: keys are verified at the gateway before they are forwarded
        assert _flag(gateway, "--api-keys-file") == _flag(specs["scheduler"], "--api-keys-file") == str(tmp_path / "k")


def test_with_inline_development_keys_the_gateway_leaves_keys_to_the_schedulers(tmp_path: Path) -> None:
    specs = _specs(MeshConfig(state_dir=tmp_path, insecure_dev_keys={"dev-key": "alice"}))
    assert "--api-keys-file" not in specs["gateway"]  # it does not know the inline keys


def test_with_tls_the_gateway_serves_https_and_reaches_etcd_with_its_own_certificate(tmp_path: Path) -> None:
    gateway = _specs(MeshConfig(state_dir=tmp_path))["gateway"]
    assert "--insecure" not in gateway
    assert _flag(gateway, "--ca-bundle") == str(tmp_path / "tls" / "ca.pem")
    assert _flag(gateway, "--tls-cert") == _flag(gateway, "--etcd-tls-cert") == str(tmp_path / "tls" / "gateway.pem")
    assert _flag(gateway, "--tls-key") == _flag(gateway, "--etcd-tls-key") == str(tmp_path / "tls" / "gateway-key.pem")
    cert = x509.load_pem_x509_certificate(Path(_flag(gateway, "--tls-cert")).read_bytes())
    common_name = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert common_name == mesh_tls.etcd_user("gateway") == "tunemesh-gateway"  # its etcd user
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = names.get_values_for_type(x509.DNSName)
    assert dns == ["gateway.tunemesh", "localhost"] and mesh_tls.role_of(dns[0]) == "gateway"
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]  # what clients dial
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value


def test_an_insecure_mesh_gets_a_plain_http_gateway(tmp_path: Path) -> None:
    gateway = _specs(MeshConfig(state_dir=tmp_path, insecure=True))["gateway"]
    assert _flag(gateway, "--insecure") == "true"
    assert not {"--ca-bundle", "--tls-cert", "--tls-key", "--etcd-tls-cert", "--etcd-tls-key"} & set(gateway)
    assert not (tmp_path / "tls").exists()


def test_no_gateway_leaves_it_out(tmp_path: Path) -> None:
    assert cli.build_parser().parse_args(["up"]).gateway is True
    args = cli.build_parser().parse_args(["up", "--no-gateway"])
    assert args.gateway is False
    assert "gateway" not in _specs(MeshConfig(state_dir=tmp_path, gateway=args.gateway))


def _mesh(tmp_path: Path, gateway_url: str, ca_file: str) -> MeshState:
    records = [ProcessRecord("etcd", "etcd", 11, None, "/l/etcd.log", address="127.0.0.1:2379"),
               ProcessRecord("scheduler", "scheduler", 12, None, "/l/s.log", "127.0.0.1:5000", "http://127.0.0.1:9000/metrics"),
               ProcessRecord("gateway", "gateway", 13, None, "/l/g.log", "127.0.0.1:8443",
                             "http://127.0.0.1:9001/metrics")]
    return MeshState(str(tmp_path), "127.0.0.1:2379", str(tmp_path / "keys.json"), records, "127.0.0.1:5000",
                     ca_file=ca_file, gateway_url=gateway_url)


def test_up_and_status_tell_the_tinker_sdk_where_and_how_to_trust_it(tmp_path: Path) -> None:
    mesh = _mesh(tmp_path, "https://127.0.0.1:8443", "/s/tls/ca.pem")
    told = cli.describe_up(mesh, state_dir_flag=False)
    assert "export TINKER_BASE_URL=https://127.0.0.1:8443" in told and "export TINKER_API_KEY=" in told
    assert "export SSL_CERT_FILE=/s/tls/ca.pem" in told  # httpx, the SDK's client, reads it
    view = status.collect_status(mesh, timeout=0.5)
    assert view["gateway_url"] == "https://127.0.0.1:8443"
    assert "gateway     https://127.0.0.1:8443" in status.render_status(view)
    plain = _mesh(tmp_path, "http://127.0.0.1:8443", "")
    assert "SSL_CERT_FILE" not in cli.describe_up(plain, state_dir_flag=False)
    none = _mesh(tmp_path, "", "/s/tls/ca.pem")
    assert "TINKER_BASE_URL" not in cli.describe_up(none, state_dir_flag=False)
    assert "gateway     " not in status.render_status(status.collect_status(none, timeout=0.5))


def test_prometheus_scrapes_the_gateway_on_its_metrics_endpoint(tmp_path: Path) -> None:
    import yaml

    config = yaml.safe_load(prometheus.scrape_config(_mesh(tmp_path, "https://127.0.0.1:8443", "").processes))
    jobs = {job["job_name"]: job["static_configs"] for job in config["scrape_configs"]}
    assert jobs["gateway"] == [{"targets": ["127.0.0.1:9001"],
                                "labels": {"node": "gateway", "__metrics_path__": "/metrics"}}]
