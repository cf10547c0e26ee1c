"""`tunemesh checkpoints list | get | download | delete | ttl | import`.

Connects to --address (default $TUNEMESH_ADDRESS, else the local mesh's scheduler, else
127.0.0.1:50051) with --api-key (default $TUNEMESH_API_KEY; never guessed).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunemesh import RetryPolicy, ServiceClient
from tunemesh.checkpoints import Checkpoint, CheckpointClient
from tunemesh.errors import TunemeshError
from tunemesh_local import keys, launcher, state

DEFAULT_ADDRESS = "127.0.0.1:50051"
CLI_RETRY = RetryPolicy(total_timeout_s=30.0, attempt_timeout_s=30.0)


class UsageError(Exception):
    """A problem with the command line or its environment, told to the user as is."""


def connection_options() -> argparse.ArgumentParser:
    """--address, --api-key and --state-dir (read by `resolve_connection`), as a parent parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", help="service address (default $TUNEMESH_ADDRESS, "
                        "else the local mesh's scheduler, else 127.0.0.1:50051)")
    common.add_argument("--api-key", help="API key (default $TUNEMESH_API_KEY)")
    common.add_argument("--state-dir", type=Path, default=None, help="local mesh state directory "
                        f"(default ${state.STATE_DIR_ENV} or ~/.tunemesh/local)")
    return common


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the `checkpoints` command group."""
    common = connection_options()
    group = commands.add_parser("checkpoints",
                                help="list, inspect, download, import and delete checkpoints")
    actions = group.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", parents=[common], help="list checkpoints")
    listing.add_argument("--run", help="only this run's checkpoints, runs/{id}")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    get = actions.add_parser("get", parents=[common], help="show one checkpoint")
    get.add_argument("path")
    get.add_argument("--json", action="store_true", help="machine-readable output")
    download = actions.add_parser("download", parents=[common],
                                  help="download a checkpoint's files")
    download.add_argument("path")
    download.add_argument("dest_dir", type=Path)
    download.add_argument("--overwrite", action="store_true",
                          help="replace files already in DEST_DIR")
    delete = actions.add_parser("delete", parents=[common], help="delete a checkpoint")
    delete.add_argument("path")
    ttl = actions.add_parser("ttl", parents=[common],
                             help="set (SECONDS) or clear (none) the expiry")
    ttl.add_argument("path")
    ttl.add_argument("seconds", type=_ttl_arg, metavar="SECONDS|none")
    imp = actions.add_parser("import", parents=[common], help="import a PEFT adapter directory")
    imp.add_argument("directory", type=Path)
    imp.add_argument("--base-model", required=True,
                     help="the base model the adapter was trained on")
    imp.add_argument("--name", required=True,
                     help="name of the new checkpoint, tunemesh://imports/NAME")
    imp.add_argument("--ttl", type=_ttl_arg, default=None,
                     help="seconds until it expires (default never)")


def run(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    """Run one `checkpoints` action; errors print `tunemesh checkpoints: ...` and return 1."""
    env = os.environ if env is None else env
    try:
        state_dir = (args.state_dir or state.default_state_dir(env)).expanduser()
        address, api_key, ca_bundle = resolve_connection(args, state_dir, env)
        with ServiceClient(address, api_key, retry_policy=CLI_RETRY, ca_bundle=ca_bundle) as service:
            return _ACTIONS[args.action](service.create_checkpoint_client(), args)
    except (TunemeshError, UsageError, OSError, ValueError) as err:
        print(f"tunemesh checkpoints: {err}", file=sys.stderr)
        return 1


def resolve_connection(
    args: argparse.Namespace, state_dir: Path, env: Mapping[str, str]
) -> tuple[str, str, str | None]:
    """The address, API key and CA bundle to use (the local mesh's CA when its address is
    used and $TUNEMESH_CA_BUNDLE names none); raises UsageError when no key was given."""
    mesh = state.load(state_dir)
    address = args.address or env.get("TUNEMESH_ADDRESS") or (mesh and mesh.scheduler_address)
    local = mesh is not None and address == mesh.scheduler_address
    ca_bundle = env.get("TUNEMESH_CA_BUNDLE") or (mesh.ca_file if local and mesh.ca_file else None)
    api_key = args.api_key or env.get("TUNEMESH_API_KEY")
    if not api_key:
        hint = ""
        if mesh is not None and (tenants := launcher.client_keys(mesh)):
            where = Path(mesh.state_dir) / keys.CLIENT_KEYS_FILE
            hint = f" (the local mesh's keys of {', '.join(tenants)} are in {where})"
        raise UsageError(f"no API key: pass --api-key{hint} or set TUNEMESH_API_KEY")
    return address or DEFAULT_ADDRESS, api_key, ca_bundle


def _ttl_arg(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        seconds = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected whole seconds or 'none', got {text!r}"
        ) from None
    if seconds < 1:
        raise argparse.ArgumentTypeError("seconds must be at least 1 (use 'none' to clear)")
    return seconds


def _list(client: CheckpointClient, args: argparse.Namespace) -> int:
    checkpoints = list(client.list(run=args.run))
    if args.json:
        print(json.dumps([checkpoint_to_json(c) for c in checkpoints], indent=2))
    else:
        print(render_table(checkpoints))
    return 0


def _get(client: CheckpointClient, args: argparse.Namespace) -> int:
    ckpt = client.get(args.path)
    print(json.dumps(checkpoint_to_json(ckpt), indent=2) if args.json else render_checkpoint(ckpt))
    return 0


def _download(client: CheckpointClient, args: argparse.Namespace) -> int:
    with progress_bar(f"download {args.path}") as progress:
        dest = client.download(
            args.path, args.dest_dir, progress=progress, overwrite=args.overwrite
        )
    print(f"downloaded {args.path} to {dest}")
    return 0


def _delete(client: CheckpointClient, args: argparse.Namespace) -> int:
    client.delete(args.path)
    print(f"deleted {args.path}")
    return 0


def _ttl(client: CheckpointClient, args: argparse.Namespace) -> int:
    ckpt = client.set_ttl(args.path, args.seconds)
    if ckpt.expire_time is None:
        print(f"{ckpt.path} never expires")
    else:
        print(f"{ckpt.path} expires at {_time(ckpt.expire_time)}")
    return 0


def _import(client: CheckpointClient, args: argparse.Namespace) -> int:
    with progress_bar(f"import {args.name}") as progress:
        ckpt = client.import_peft(args.directory, base_model=args.base_model, name=args.name,
                                  ttl_seconds=args.ttl, progress=progress)
    print(f"imported {args.directory} as {ckpt.path}")
    return 0


_ACTIONS: dict[str, Callable[[CheckpointClient, argparse.Namespace], int]] = {
    "list": _list, "get": _get, "download": _download,
    "delete": _delete, "ttl": _ttl, "import": _import,
}


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress(done, total) callback drawing a tqdm bar in bytes on stderr."""
    from tqdm import tqdm

    bar = tqdm(desc=description, unit="B", unit_scale=True, unit_divisor=1024,
               file=sys.stderr, leave=False)

    def progress(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        bar.close()


def render_table(checkpoints: list[Checkpoint]) -> str:
    """One row per checkpoint: path, kind, step, size, created, expires."""
    header = ("PATH", "KIND", "STEP", "SIZE", "CREATED", "EXPIRES")
    rows = [header] + [
        (c.path, c.kind, str(c.step), human_bytes(c.size_bytes), _time(c.create_time),
         _time(c.expire_time))
        for c in checkpoints
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if not checkpoints:
        lines.append("(no checkpoints)")
    return "\n".join(lines)


def render_checkpoint(ckpt: Checkpoint) -> str:
    """A checkpoint's fields, one per line, then its labels and files."""
    lora = ckpt.lora_config
    fields = [
        ("path", ckpt.path), ("kind", ckpt.kind), ("run", ckpt.run or "-"),
        ("base model", ckpt.base_model),
        ("lora", f"rank {lora.rank}, alpha {lora.alpha or lora.rank}"),
        ("step", str(ckpt.step)), ("optimizer", "yes" if ckpt.has_optimizer_state else "no"),
        ("size", human_bytes(ckpt.size_bytes)), ("created", _time(ckpt.create_time)),
        ("expires", _time(ckpt.expire_time)),
    ]
    fields += [("metadata", f"{k}={v}") for k, v in sorted(ckpt.user_metadata.items())]
    fields += [
        ("file", f"{f.name}  {human_bytes(f.size_bytes)}  sha256 {f.sha256}") for f in ckpt.files
    ]
    return "\n".join(f"{key + ':':<12} {value}" for key, value in fields)


def checkpoint_to_json(ckpt: Checkpoint) -> dict[str, Any]:
    """A checkpoint as JSON-ready data; times as ISO 8601 (null: never expires)."""
    data = dataclasses.asdict(ckpt)
    data["create_time"] = ckpt.create_time.isoformat()
    data["expire_time"] = ckpt.expire_time.isoformat() if ckpt.expire_time else None
    return data


def human_bytes(size: int) -> str:
    """1536 -> '1.5 KiB'."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _time(moment: datetime.datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%SZ") if moment else "never"
