"""`tunemesh keys create | list | revoke`, and the keys `tunemesh up` makes for its mesh.

The scheduler's keys file (`tunemesh_common.service.api_keys`) holds salted hashes only;
a key is shown once, when it is made. `tunemesh up` makes one key per tenant of a fresh
state dir and keeps them for its clients in `client_keys.json` ({tenant: key}, mode
0600), next to the hashed `api_keys.json` the schedulers read (re-read on change: a
created or revoked key takes effect within seconds, without a restart).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from tunemesh.errors import InvalidArgumentError, NotFoundError, TunemeshError
from tunemesh_common.service import api_keys
from tunemesh_common.service.api_keys import KeyRecord
from tunemesh_local import state

KEYS_FILE = "api_keys.json"  # hashed, read by the schedulers
CLIENT_KEYS_FILE = "client_keys.json"  # {tenant: key} of the keys `tunemesh up` made, for local clients
DEFAULT_TENANTS = ("alice", "bob")
# What `tunemesh up` wrote before keys were hashed: replaced by fresh keys when found.
_OLD_DEMO_KEYS = {"tml-demo-alice": "alice", "tml-demo-bob": "bob"}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serializes read-modify-write of one keys file between processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read(path: Path) -> list[KeyRecord]:
    """The records of a keys file; an absent file has none."""
    if not Path(path).exists():
        return []
    try:
        return api_keys.read_key_file(path)
    except api_keys.KeyFileError as err:
        raise InvalidArgumentError("BAD_API_KEYS_FILE", str(err)) from None


def create(path: Path, tenant: str) -> tuple[str, KeyRecord]:
    """A new key for `tenant`, its hash added to `path` (made if absent)."""
    if not tenant.strip():
        raise InvalidArgumentError("BAD_TENANT", "--tenant must not be empty")
    with _locked(Path(path)):
        records = read(path)
        key, record = api_keys.new_key(tenant)
        api_keys.write_key_file(path, [*records, record])
    return key, record


def revoke(path: Path, key_id: str) -> KeyRecord:
    """Mark key `key_id` revoked in `path` (kept, so `list` still shows it)."""
    with _locked(Path(path)):
        records = read(path)
        if not any(r.id == key_id for r in records):
            raise NotFoundError("UNKNOWN_KEY", f"no key {key_id!r} in {path}")
        records = [dataclasses.replace(r, revoked=True) if r.id == key_id else r for r in records]
        api_keys.write_key_file(path, records)
    return next(r for r in records if r.id == key_id)


def client_keys(state_dir: Path) -> dict[str, str]:
    """{tenant: key} of the keys `tunemesh up` made in `state_dir` ({} when none)."""
    path = Path(state_dir) / CLIENT_KEYS_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise InvalidArgumentError("BAD_CLIENT_KEYS_FILE", f"{path} is not valid JSON: {err}") from None


def ensure_mesh_keys(state_dir: Path, tenants: Iterable[str] = DEFAULT_TENANTS) -> Path:
    """The state dir's keys file, with a key made for each of `tenants` that has none yet
    (kept across restarts of the mesh); the keys go to `client_keys.json`."""
    path, clients_path = Path(state_dir) / KEYS_FILE, Path(state_dir) / CLIENT_KEYS_FILE
    _replace_old_demo_keys(path)
    clients = client_keys(state_dir)
    missing = [t for t in dict.fromkeys(tenants) if t not in clients]
    if missing or not path.exists():
        with _locked(path):
            records = read(path)
            for tenant in missing:
                key, record = api_keys.new_key(tenant)
                clients[tenant] = key
                records.append(record)
            api_keys.write_key_file(path, records)
        _write_private(clients_path, json.dumps(clients, indent=2) + "\n")
    return path


def _replace_old_demo_keys(path: Path) -> None:
    """A keys file of the well-known demo keys an older `tunemesh up` wrote is removed."""
    try:
        if json.loads(path.read_text()) == _OLD_DEMO_KEYS:
            path.unlink()
    except (OSError, ValueError):
        pass


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# the CLI --------------------------------------------------------------------------------


def add_parser(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="make, list and revoke API keys (hashed in a keys file)")
    actions = keys.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--file", type=Path, default=None,
                        help=f"keys file (default: the local mesh's, <state dir>/{KEYS_FILE})")
    common.add_argument("--state-dir", type=Path, default=None,
                        help=f"state directory (default ${state.STATE_DIR_ENV} or ~/.tunemesh/local)")
    create_ = actions.add_parser("create", parents=[common], help="make a key for a tenant and print it once")
    create_.add_argument("--tenant", required=True, help="the tenant the key authenticates as")
    list_ = actions.add_parser("list", parents=[common], help="ids, tenants, created, revoked (never a secret)")
    list_.add_argument("--json", action="store_true", help="machine-readable output")
    revoke_ = actions.add_parser("revoke", parents=[common], help="revoke a key by its id")
    revoke_.add_argument("id", help="the key id (`tunemesh keys list`; a key reads tml-<id>-<secret>)")


def run(args: argparse.Namespace) -> int:
    path = args.file or (args.state_dir or state.default_state_dir()).expanduser() / KEYS_FILE
    try:
        if args.action == "create":
            key, record = create(path, args.tenant)
            print(f"created key {record.id} for tenant {record.tenant} in {path}; it is shown only now:",
                  file=sys.stderr)
            print(key)
        elif args.action == "list":
            records = read(path)
            rows = [{"id": r.id, "tenant": r.tenant, "created": r.created, "revoked": r.revoked} for r in records]
            print(json.dumps(rows, indent=2) if args.json else render_table(rows))
        else:
            record = revoke(path, args.id)
            print(f"revoked key {record.id} of tenant {record.tenant} in {path}")
    except (TunemeshError, OSError) as err:
        print(f"tunemesh keys: {getattr(err, 'message', None) or err}", file=sys.stderr)
        return 1
    return 0


def render_table(rows: list[dict]) -> str:
    if not rows:
        return "no keys"
    lines = [f"{'ID':<14}{'TENANT':<20}{'CREATED':<22}REVOKED"]
    lines += [f"{r['id']:<14}{r['tenant']:<20}{r['created'] or '-':<22}{'yes' if r['revoked'] else 'no'}"
              for r in rows]
    return "\n".join(lines)
