"""Raw gRPC channels of the benches, over TLS when the bench's mesh runs it (the default):
the public port trusts the mesh CA ($TUNEMESH_CA_BUNDLE, which the bench meshes set while
they run); a trainer's port takes the scheduler's certificate (mutual TLS)."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from tunemesh.transport import channel_credentials, public_target


def public_channel(address: str, options: list | None = None, aio: bool = False):
    """A channel to the scheduler replicas at `address` (sync, or grpc.aio with `aio`), as
    the SDK opens one ($TUNEMESH_CA_BUNDLE: TLS)."""
    credentials = channel_credentials(os.environ.get("TUNEMESH_CA_BUNDLE") or None, None,
                                      source="TUNEMESH_CA_BUNDLE")
    target, tls_options = public_target(address, credentials is not None)
    options = [*(options or []), *tls_options]
    if credentials is None:
        return (grpc.aio.insecure_channel if aio else grpc.insecure_channel)(target, options=options)
    return (grpc.aio.secure_channel if aio else grpc.secure_channel)(target, credentials, options=options)


def trainer_channel(mesh, node_id: str, address: str) -> grpc.Channel:
    """A sync channel to trainer `node_id`, as the mesh's scheduler (its certificate)."""
    if not mesh.tls_dir:
        return grpc.insecure_channel(address)
    tls_dir = Path(mesh.tls_dir)
    credentials = grpc.ssl_channel_credentials(Path(mesh.ca_file).read_bytes(), (tls_dir / "scheduler-key.pem").read_bytes(),
                                               (tls_dir / "scheduler.pem").read_bytes())
    return grpc.secure_channel(address, credentials,
                               options=[("grpc.ssl_target_name_override", f"{node_id}.trainer.tunemesh")])
