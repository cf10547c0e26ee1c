"""Reaching a test mesh's processes directly (not through the SDK), over TLS when the mesh
runs it: raw scheduler stubs, health and reflection checks, etcdctl."""

from __future__ import annotations

from pathlib import Path

import grpc

from tunemesh.transport import channel_credentials, public_target
from tunemesh_common.security.tls import NODE_ROLES, identity_name
from tunemesh_local.state import MeshState, ProcessRecord
from tunemesh_local.status import admin_tls


def scheduler_channel(mesh: MeshState) -> grpc.Channel:
    """A sync channel to the mesh's scheduler replicas, as a client: TLS trusting the mesh
    CA (no client certificate), or plaintext for an --insecure mesh."""
    target, options = public_target(mesh.scheduler_address, bool(mesh.ca_file))
    if not mesh.ca_file:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, channel_credentials(mesh.ca_file, True), options=options)


def process_channel(mesh: MeshState, record: ProcessRecord) -> grpc.Channel:
    """A sync channel to one mesh process with the mesh's admin certificate (a mesh CA
    certificate that internal servers admit to health and reflection only), checking the
    process proves its identity; plaintext for an --insecure mesh."""
    options = [("grpc.enable_http_proxy", 0)]
    if not mesh.tls_dir:
        return grpc.insecure_channel(record.address, options=options)
    admin = admin_tls(mesh)
    identity = identity_name(record.role, record.name if record.role in NODE_ROLES else "")
    return grpc.secure_channel(record.address, grpc.ssl_channel_credentials(admin.ca_pem, admin.key_pem, admin.cert_pem),
                               options=[*options, ("grpc.ssl_target_name_override", identity)])


def etcdctl_flags(mesh: MeshState) -> list[str]:
    """etcdctl's TLS flags for the mesh's etcd (the admin certificate: etcd's root user)."""
    if not mesh.tls_dir:
        return []
    tls_dir = Path(mesh.tls_dir)
    return ["--cacert", mesh.ca_file, "--cert", str(tls_dir / "admin.pem"), "--key", str(tls_dir / "admin-key.pem")]


def etcdctl(mesh: MeshState) -> list[str]:
    """`etcdctl --endpoints URL [TLS flags]` for the mesh's etcd."""
    scheme = "https://" if mesh.tls_dir else "http://"
    return ["etcdctl", "--endpoints", scheme + mesh.etcd_endpoint, *etcdctl_flags(mesh)]
