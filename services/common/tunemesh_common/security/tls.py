"""TLS on every hop of the mesh: credentials, the names peers verify, who may call whom.

Each process holds a certificate of the mesh CA (`pki.py` makes them) whose DNS
subject alternative names carry its **mesh identity** (`identity_name`):

    scheduler.tunemesh            checkpoint.tunemesh          admin.tunemesh
    <node_id>.trainer.tunemesh    <node_id>.sampler.tunemesh   etcd.tunemesh
    gateway.tunemesh              (the Tinker HTTP gateway: a client of the scheduler's
                                  public port and of etcd, which no mesh server admits)

- A channel to a mesh peer verifies the peer's certificate against the CA and checks
  the identity it expects (`grpc.ssl_target_name_override`), not the host it dials: the
  scheduler reaches trainer `t1` at whatever address its etcd record holds, and the
  handshake fails unless the server there proves it is `t1.trainer.tunemesh`. A
  Kubernetes deployment can give all trainers one wildcard certificate
  (`*.trainer.tunemesh`), which proves the role, not the node.
- Internal servers require a client certificate (mutual TLS) and authorize the caller's
  role (`PeerPolicy`): only the scheduler calls trainers and samplers; the checkpoint
  service takes calls of the scheduler, trainers and samplers only, so the tenant it is
  told in metadata always comes from a mesh identity.
- The scheduler's public port is server TLS only (clients authenticate by API key); its
  certificate also names the hosts clients dial (localhost, 127.0.0.1, a Service name).

Plaintext needs an explicit `--insecure true` on every service (development only).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence

import grpc

from tunemesh.errors import PermissionDeniedError

DOMAIN = "tunemesh"
SINGLE_ROLES = frozenset({"scheduler", "checkpoint", "admin", "etcd", "gateway"})  # one identity per role
NODE_ROLES = frozenset({"trainer", "sampler"})  # one identity per node
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def identity_name(role: str, node_id: str = "") -> str:
    """The mesh identity of `role` (and `node_id`, for trainers and samplers): a DNS name."""
    if role in SINGLE_ROLES and not node_id:
        return f"{role}.{DOMAIN}"
    if role in NODE_ROLES and node_id:
        check_node_id(node_id)
        return f"{node_id}.{role}.{DOMAIN}"
    raise ValueError(f"no mesh identity for role {role!r} with node id {node_id!r}")


def check_node_id(node_id: str) -> str:
    """`node_id` if it can be part of a mesh identity (a DNS label: lowercase letters, digits
    and '-', at most 63), else ValueError."""
    if not _LABEL.fullmatch(node_id):
        raise ValueError(f"node id {node_id!r} must be a DNS label (a-z, 0-9 and '-', at most 63, "
                         "starting and ending with a letter or digit): it names the node's certificate")
    return node_id


def etcd_user(role: str) -> str:
    """The etcd user (the certificate's common name) of `role`: etcd's client-certificate
    auth grants a certificate the roles of the user its CN names."""
    return "root" if role == "admin" else f"{DOMAIN}-{role}"


def role_of(name: str) -> str | None:
    """The mesh role a certificate name proves (`t1.trainer.tunemesh` -> trainer; a
    wildcard `*.trainer.tunemesh` proves the role too), None for other names."""
    parts = name.split(".")
    if len(parts) == 2 and parts[1] == DOMAIN and parts[0] in SINGLE_ROLES:
        return parts[0]
    if len(parts) == 3 and parts[2] == DOMAIN and parts[1] in NODE_ROLES and parts[0]:
        return parts[1]
    return None


@dataclasses.dataclass(frozen=True)
class MeshTls:
    """This process's TLS material: the mesh CA, its certificate chain and key (PEM)."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def from_files(cls, ca: pathlib.Path, cert: pathlib.Path, key: pathlib.Path) -> MeshTls:
        """Read the three PEM files; ValueError naming the file that is missing or not PEM."""
        values = []
        for what, path, marker in (("CA bundle", ca, b"CERTIFICATE"), ("certificate", cert, b"CERTIFICATE"),
                                   ("key", key, b"PRIVATE KEY")):
            try:
                data = pathlib.Path(path).read_bytes()
            except OSError as err:
                raise ValueError(f"cannot read the TLS {what} {path}: {err.strerror}") from None
            if b"-----BEGIN" not in data or marker not in data:
                raise ValueError(f"the TLS {what} {path} is not a PEM {marker.decode().lower()}")
            values.append(data)
        return cls(*values)

    def server_credentials(self, *, client_auth: bool) -> grpc.ServerCredentials:
        """Server credentials; with `client_auth`, a caller must present a certificate of
        the mesh CA (mutual TLS), else the handshake fails."""
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem,
                                           require_client_auth=client_auth)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client credentials: trust the mesh CA only, present this process's certificate."""
        return grpc.ssl_channel_credentials(self.ca_pem, self.key_pem, self.cert_pem)

    def channel(self, address: str, peer: str, options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
        """A grpc.aio channel to `address` that accepts only a server proving identity `peer`."""
        return grpc.aio.secure_channel(address, self.channel_credentials(),
                                       options=[*options, ("grpc.ssl_target_name_override", peer)])


def open_channel(address: str, tls: MeshTls | None, peer: str,
                 options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
    """A channel to mesh peer `peer` (its identity name) at `address`: TLS when `tls` is
    given, else plaintext (--insecure)."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return tls.channel(address, peer, options)


def caller_names(context: grpc.ServicerContext) -> list[str]:
    """The DNS names of the caller's verified certificate ([] without one)."""
    auth = context.auth_context() or {}
    return [value.decode() for value in auth.get("x509_subject_alternative_name", ())]


PeerRules = Mapping[str, frozenset[str]]  # gRPC method path or "/pkg.Service/" prefix -> roles; "" the default


class PeerPolicy:
    """Which mesh roles may call a server, by method: `rules` maps a method path
    (`/pkg.Service/Method`), a service prefix (`/pkg.Service/`) or "" (every other
    method) to the roles allowed; the most specific entry applies. `check(context,
    method)` returns the caller's role or raises PERMISSION_DENIED [PEER_NOT_ALLOWED]
    naming what the caller proved."""

    def __init__(self, service: str, rules: PeerRules | Iterable[str]) -> None:
        self.service = service
        self.rules = dict(rules) if isinstance(rules, Mapping) else {"": frozenset(rules)}

    def allowed(self, method: str) -> frozenset[str]:
        if method in self.rules:
            return self.rules[method]
        prefix = method[:method.rfind("/") + 1]
        return self.rules.get(prefix, self.rules.get("", frozenset()))

    def check(self, context: grpc.ServicerContext, method: str) -> str:
        allowed = self.allowed(method)
        names = caller_names(context)
        for name in names:
            role = role_of(name)
            if role in allowed:
                return role
        proved = ", ".join(names) or "no mesh certificate"
        takes = ", ".join(sorted(allowed)) or "no caller"
        raise PermissionDeniedError(
            "PEER_NOT_ALLOWED", f"the {self.service} takes {method} from {takes} only; the caller proved {proved}")
