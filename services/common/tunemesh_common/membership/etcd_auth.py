"""etcd's users and roles for a mesh over mutual TLS, and the command that sets them up.

etcd runs with `--client-cert-auth`: a client proves a certificate of the mesh CA, and
etcd takes the certificate's common name as the user whose roles apply (no password, no
token). Each user has one role of the same name, readwrite on the key prefixes below:

    root                  role root: users, roles, enabling auth (the admin certificate)
    tunemesh-scheduler    /tunemesh/                 everything the mesh keeps: runs,
                                                     placement, sessions, operation log,
                                                     leadership, and reading the node records
    tunemesh-trainer      /tunemesh/nodes/trainers/  its node record, under its lease
    tunemesh-sampler      /tunemesh/nodes/samplers/  likewise
    tunemesh-checkpoint   (nothing)                  the checkpoint service does not use etcd
    tunemesh-gateway      /tunemesh/gateway/         the Tinker gateway's tables (model ids,
                                                     sampling sessions), nothing of the mesh's

So a node record is written only by a node certificate of that kind (or the scheduler):
the scheduler sends work to the addresses those records hold, and a trainer or sampler
cannot place runs, rewrite the scheduler's journal or pose as a node of the other kind.
The gateway, which faces Tinker clients over HTTP, reads and writes its own tables only:
it can neither read the scheduler's runs and journal nor forge a node record.
(etcd permissions are per user, not per key owner: any trainer certificate may write
any trainer's record. The records are reachable only through mutual TLS to the node's
own identity, `<node_id>.trainer.tunemesh`, which a forged record cannot give.)

tunemesh-checkpoint is created with no role: the certificate then authenticates to etcd
but may read or write nothing, and giving it access later is one grant, not a new user.

`enable_auth` is idempotent: on an etcd where it ran before (auth on, so it must be the
root certificate), etcd's FAILED_PRECONDITION "... already exists" answers count as done,
granting a role that is held and enabling auth that is on succeed, and a permission that
is held is not granted again (that would bump etcd's auth revision, see `_grant_prefix`).

    python -m tunemesh_common.membership.etcd_auth --endpoint etcd:2379 \\
        --tls-ca ca.pem --tls-cert admin.pem --tls-key admin-key.pem

(a Kubernetes Job runs it once etcd is up; it waits for etcd up to `--wait-s`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib
import sys
import time
from collections.abc import Awaitable, Sequence

import grpc
from aetcd import rpc as aetcd_rpc
from aetcd.rpc import auth_pb2
from aetcd.utils import prefix_range_end

from tunemesh.errors import InvalidArgumentError, TunemeshError, UnavailableError, error_for
from tunemesh_common.membership.registry import ROOT, node_prefix, parse_endpoint
from tunemesh_common.security import pki
from tunemesh_common.security.tls import MeshTls, etcd_user, identity_name

logger = logging.getLogger(__name__)

ROOT_USER = etcd_user("admin")  # "root"
# Mesh role -> key prefixes its etcd user may read and write (see the module docstring).
ACCESS: dict[str, tuple[bytes, ...]] = {
    "scheduler": (f"{ROOT}/".encode(),),
    "trainer": (node_prefix("trainers"),),
    "sampler": (node_prefix("samplers"),),
    "checkpoint": (),
    "gateway": (f"{ROOT}/gateway/".encode(),),
}
CALL_TIMEOUT_S = 10.0
_ALREADY = "already exist"  # etcd 3.4: "etcdserver: user name already exists", "... role name ..."


async def enable_auth(endpoint: str, admin: MeshTls, timeout: float = CALL_TIMEOUT_S) -> None:
    """Create the root user and the mesh's users and roles (`ACCESS`), then turn etcd's
    auth on, as the admin certificate (CN root) over mutual TLS to `etcd.tunemesh` at
    `host:port`. Idempotent. Raises the typed error of etcd's answer (UNAVAILABLE when
    etcd cannot be reached or the TLS handshake fails, PERMISSION_DENIED for a
    certificate that is not root's once auth is on)."""
    parse_endpoint(endpoint)
    cn = pki.common_name(admin.cert_pem)
    if cn != ROOT_USER:
        raise InvalidArgumentError("NOT_ETCD_ROOT", f"the admin certificate's common name is {cn!r}, not "
                                                    f"{ROOT_USER!r}: etcd would not take it as its root user")
    channel = admin.channel(endpoint, identity_name("etcd"), options=[("grpc.enable_http_proxy", 0)])
    async with channel:
        stub = aetcd_rpc.AuthStub(channel)
        # etcd 3.4 enables auth only once user root holds role root (etcdctl adds the role too).
        await _ensure("add role root", stub.RoleAdd(aetcd_rpc.AuthRoleAddRequest(name=ROOT_USER), timeout=timeout))
        await _add_user(stub, ROOT_USER, ROOT_USER, timeout)
        for role, prefixes in ACCESS.items():
            await _add_user(stub, etcd_user(role), etcd_user(role) if prefixes else None, timeout)
            for prefix in prefixes:
                await _grant_prefix(stub, etcd_user(role), prefix, timeout)
        await _ensure("enable auth", stub.AuthEnable(aetcd_rpc.AuthEnableRequest(), timeout=timeout))
    logger.info("etcd auth on at %s: users %s", endpoint, ", ".join([ROOT_USER, *map(etcd_user, ACCESS)]))


async def _add_user(stub: aetcd_rpc.AuthStub, user: str, role: str | None, timeout: float) -> None:
    """User `user` without a password (only a certificate with CN `user` is it), holding
    role `role` (created when it is not root's) if given."""
    options = auth_pb2.UserAddOptions(no_password=True)
    await _ensure(f"add user {user}", stub.UserAdd(aetcd_rpc.AuthUserAddRequest(name=user, options=options),
                                                   timeout=timeout))
    if role is None:
        return
    if role != ROOT_USER:
        await _ensure(f"add role {role}", stub.RoleAdd(aetcd_rpc.AuthRoleAddRequest(name=role), timeout=timeout))
    await _ensure(f"grant role {role} to {user}",
                  stub.UserGrantRole(aetcd_rpc.AuthUserGrantRoleRequest(user=user, role=role), timeout=timeout))


async def _grant_prefix(stub: aetcd_rpc.AuthStub, role: str, prefix: bytes, timeout: float) -> None:
    """Give `role` readwrite on the keys under `prefix`, unless it has that already: etcd
    3.4 bumps its auth revision on every grant, even a repeated one, and a request that a
    client sent under the older revision then fails ("revision of auth store is old"), so a
    rerun on a live mesh changes nothing."""
    perm = auth_pb2.Permission(permType=auth_pb2.Permission.READWRITE, key=prefix, range_end=prefix_range_end(prefix))
    step = f"grant {role} readwrite on {prefix.decode()}"
    try:
        held = await stub.RoleGet(aetcd_rpc.AuthRoleGetRequest(role=role), timeout=timeout)
    except grpc.aio.AioRpcError as err:
        raise error_for(err.code(), "ETCD_AUTH_SETUP_FAILED", f"{step}: {err.details()}") from None
    if perm in held.perm:
        return
    await _ensure(step, stub.RoleGrantPermission(aetcd_rpc.AuthRoleGrantPermissionRequest(name=role, perm=perm),
                                                 timeout=timeout))


async def _ensure(step: str, call: Awaitable) -> None:
    """Await one auth call; an "already exists" answer is success, any other failure the
    typed error of its code, naming the step."""
    try:
        await call
    except grpc.aio.AioRpcError as err:
        details = err.details() or ""
        if err.code() == grpc.StatusCode.FAILED_PRECONDITION and _ALREADY in details:
            logger.debug("etcd auth: %s: %s (done before)", step, details)
            return
        raise error_for(err.code(), "ETCD_AUTH_SETUP_FAILED", f"{step}: {details}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tunemesh_common.membership.etcd_auth`: 0 when etcd's auth is set up, 1
    with a one-line error otherwise (2 for a bad command line)."""
    parser = argparse.ArgumentParser(prog="python -m tunemesh_common.membership.etcd_auth",
                                     description="Create the mesh's etcd users and roles and enable auth "
                                                 "(idempotent), as the root certificate over mutual TLS.")
    parser.add_argument("--endpoint", required=True, help="etcd client endpoint, host:port")
    parser.add_argument("--tls-ca", required=True, type=pathlib.Path, help="mesh CA bundle (PEM)")
    parser.add_argument("--tls-cert", required=True, type=pathlib.Path, help="admin certificate, CN root (PEM)")
    parser.add_argument("--tls-key", required=True, type=pathlib.Path, help="admin key (PEM)")
    parser.add_argument("--wait-s", type=float, default=60.0,
                        help="keep trying this long while etcd is unreachable (default 60)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        admin = MeshTls.from_files(args.tls_ca, args.tls_cert, args.tls_key)
        asyncio.run(_enable_when_reachable(args.endpoint, admin, args.wait_s))
    except (TunemeshError, ValueError) as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    return 0


async def _enable_when_reachable(endpoint: str, admin: MeshTls, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await enable_auth(endpoint, admin)
        except UnavailableError as err:
            if time.monotonic() >= deadline:
                raise
            logger.warning("etcd at %s not reachable (%s); retrying", endpoint, err.message)
        await asyncio.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
