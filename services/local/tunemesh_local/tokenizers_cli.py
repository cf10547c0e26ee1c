"""`tunemesh tokenizers sync [--hf-home DIR]`: the mesh's tokenizers into a Hugging Face cache.

For each base model the mesh serves (GetCapabilities), the tokenizer files and config.json
(GetTokenizer, as the caller) become that model's `main` snapshot in the hub cache
(`tunemesh_local.hub_cache`), so code that loads tokenizers by model name, like the Tinker
SDK and cookbook, works offline: `HF_HUB_OFFLINE=1 python -c "from transformers import
AutoTokenizer; AutoTokenizer.from_pretrained('tunemesh/tiny-dense')"`.

Connects like `tunemesh checkpoints`: --address (default $TUNEMESH_ADDRESS, else the local
mesh's scheduler, else 127.0.0.1:50051), --api-key (default $TUNEMESH_API_KEY), the CA of
$TUNEMESH_CA_BUNDLE or of the local mesh.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import grpc

from tunemesh import RetryPolicy
from tunemesh.errors import TunemeshError
from tunemesh.transport import Transport, channel_credentials
from tunemesh.v1 import sessions_pb2
from tunemesh_local import hub_cache, state
from tunemesh_local.checkpoints_cli import UsageError, connection_options, resolve_connection

DEFAULT_TIMEOUT_S = 30.0
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register the `tokenizers` command group."""
    group = commands.add_parser("tokenizers", help="copy the served models' tokenizers into a Hugging Face cache")
    actions = group.add_subparsers(dest="action", required=True)
    sync = actions.add_parser(
        "sync", parents=[connection_options()],
        help="write each served model's tokenizer files as its snapshot in the Hugging Face hub cache, so "
             "AutoTokenizer.from_pretrained(NAME) loads them with HF_HUB_OFFLINE=1")
    sync.add_argument("--hf-home", type=Path, default=None, metavar="DIR",
                      help="Hugging Face home: writes DIR/hub (default: where Hugging Face looks, $HF_HUB_CACHE, "
                           "else $HF_HOME/hub, else ~/.cache/huggingface/hub)")
    sync.add_argument("--model", action="append", dest="models", metavar="NAME",
                      help="only this served model (repeat for more; default: every model the mesh serves)")
    sync.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                      help=f"give up on an unreachable mesh after this long (default {DEFAULT_TIMEOUT_S:g})")


def run(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    """Run `tokenizers sync`: 0 when every model was written, else 1 (reasons on stderr)."""
    env = os.environ if env is None else env
    try:
        state_dir = (args.state_dir or state.default_state_dir(env)).expanduser()
        address, api_key, ca_bundle = resolve_connection(args, state_dir, env)
        hub = hub_cache.hub_dir(args.hf_home, env)
        policy = RetryPolicy(total_timeout_s=args.timeout, attempt_timeout_s=args.timeout)
        transport = Transport.connect(address, api_key, policy, channel_credentials(ca_bundle, None))
    except (UsageError, ValueError, OSError) as err:
        return _fail(str(err))
    try:
        code = sync(transport, address, hub, args.models)
    finally:
        transport.close()
    if code == 0:
        home = f" HF_HOME={hub.parent}" if args.hf_home is not None else ""
        print(f"Load them by name offline with:{home} HF_HUB_OFFLINE=1")
    return code


def sync(transport: Transport, address: str, hub: Path, only: list[str] | None = None) -> int:
    """Write the tokenizer of each served model (or of `only`) into the cache at `hub`."""
    try:
        served = [m.name for m in transport.call(transport.sessions.GetCapabilities,
                                                 sessions_pb2.GetCapabilitiesRequest(), what="GetCapabilities").models]
    except TunemeshError as err:
        if err.code in _UNREACHABLE:
            return _fail(f"cannot reach the mesh at {address}: {err}")
        return _fail(f"the mesh at {address} refused GetCapabilities: {err}")
    models = served if not only else list(dict.fromkeys(only))
    if unknown := [m for m in models if m not in served]:
        return _fail(f"the mesh does not serve {', '.join(unknown)} (served: {', '.join(served) or 'none'})")
    if not models:
        return _fail(f"the mesh at {address} serves no models right now (no trainer registered?)")
    failed = 0
    for model in models:
        try:
            hub_cache.repo_folder(model)
        except ValueError as err:
            if only:
                failed += 1
            _warn(f"skipped {model}: {err}; load its tokenizer with tunemesh's get_tokenizer instead")
            continue
        try:
            print(describe(_write(transport, hub, model)), flush=True)
        except (TunemeshError, ValueError, OSError) as err:
            failed += 1
            _warn(f"{model}: {err}")
    if failed:
        return _fail(f"{failed} of {len(models)} model(s) not written")
    return 0


def _write(transport: Transport, hub: Path, model: str) -> hub_cache.Snapshot:
    response = transport.call(transport.sessions.GetTokenizer, sessions_pb2.GetTokenizerRequest(base_model=model),
                              what="GetTokenizer")
    files: dict[str, bytes] = {}
    for f in response.files:
        if f.name in files:
            raise ValueError(f"the mesh sent {f.name} twice")
        files[f.name] = f.content
    return hub_cache.write_snapshot(hub, model, files)


def describe(snapshot: hub_cache.Snapshot) -> str:
    """One line on what was written for a model."""
    what = "wrote" if snapshot.changed else "already had"
    return f"{snapshot.model}: {what} revision {snapshot.revision} ({', '.join(snapshot.files)}) in {snapshot.path}"


def _warn(message: str) -> None:
    print(f"tunemesh tokenizers: {message}", file=sys.stderr, flush=True)


def _fail(message: str) -> int:
    _warn(message)
    return 1
