"""The certificates of a local mesh: a CA kept in the state dir, one certificate per process.

    <state_dir>/tls/ca.pem, ca-key.pem (0600)     the mesh CA (made once, kept across `up`s)
    <state_dir>/tls/<name>.pem, <name>-key.pem    one per process (scheduler, trainer-0, etcd, admin...)

A mesh started with `MeshConfig.ca_dir` takes its CA from there instead (tests share one
CA across meshes, so one `TUNEMESH_CA_BUNDLE` fits them all). Each certificate names its
mesh identity and etcd user (`tunemesh_common.security.tls`); the scheduler's, etcd's and
the gateway's also name localhost and 127.0.0.1, which clients dial (the gateway's HTTPS
listener serves its certificate to Tinker clients, and proves it to etcd as its user).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tunemesh_common.security import pki
from tunemesh_common.security.tls import etcd_user, identity_name

LOOPBACK_NAMES = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1",)
DIALLED_ROLES = ("scheduler", "etcd", "gateway")


@dataclasses.dataclass(frozen=True)
class ProcessCert:
    """The three files a process is started with (`--tls-ca`, `--tls-cert`, `--tls-key`)."""

    ca: Path
    cert: Path
    key: Path

    def flags(self) -> list[str]:
        return ["--tls-ca", str(self.ca), "--tls-cert", str(self.cert), "--tls-key", str(self.key)]


class MeshCerts:
    """Issues the certificates of one mesh from its CA (made on first use)."""

    def __init__(self, tls_dir: Path, ca_dir: Path | None = None) -> None:
        self.tls_dir = Path(tls_dir)
        ca_dir = Path(ca_dir) if ca_dir is not None else self.tls_dir
        self.ca_file = ca_dir / "ca.pem"
        key_file = ca_dir / "ca-key.pem"
        if self.ca_file.is_file() and key_file.is_file():
            self._ca = pki.Authority.load(self.ca_file, key_file)
        else:
            self._ca = pki.Authority.create()
            self._ca.write(ca_dir)

    def issue(self, name: str, role: str, node_id: str = "") -> ProcessCert:
        """The certificate of process `name` with `role`'s identity (and `node_id`'s, for
        a trainer or sampler), written as `<name>.pem` / `<name>-key.pem`."""
        dns = [identity_name(role, node_id)]
        ips: tuple[str, ...] = ()
        if role in DIALLED_ROLES:  # dialled by address: clients check these names
            dns += LOOPBACK_NAMES
            ips = LOOPBACK_IPS
        issued = self._ca.issue(etcd_user(role), dns, ips)
        cert, key = issued.write(self.tls_dir, name)
        return ProcessCert(self.ca_file, cert, key)
