"""`tunemesh up | status | down`: a local mesh on loopback; `tunemesh checkpoints ...`;
`tunemesh keys create | list | revoke`; `tunemesh tokenizers sync` (into a Hugging Face cache).

State dir: --state-dir, else $TUNEMESH_STATE_DIR, else ~/.tunemesh/local.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tunemesh.errors import TunemeshError
from tunemesh_local import checkpoints_cli, keys, launcher, state, status, tokenizers_cli
from tunemesh_local.launcher import MeshConfig, ServiceFactory
from tunemesh_local.state import MeshState


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunemesh", description="Run a tunemesh mesh on this machine.")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start etcd, trainers, samplers, schedulers and the Tinker gateway in the "
                                         "background")
    up.add_argument("--trainers", type=int, default=1, help="trainer processes (default 1)")
    up.add_argument("--trainer-ranks", type=int, default=1,
                    help="ranks per trainer: > 1 makes each a DeepSpeed ZeRO-3 group (needs deepspeed; default 1)")
    up.add_argument("--trainer-expert-parallel", type=int, default=1, metavar="P",
                    help="MoE models: each trainer's ranks split every layer's experts in groups of P "
                         "(divides --trainer-ranks; default 1: every rank holds all experts)")
    up.add_argument("--models", nargs="+", default=[], metavar="NAME",
                    help="base models, assigned to trainers round-robin (default: the trainer's default)")
    up.add_argument("--api-keys-file", type=Path,
                    help="keys file of hashed API keys (`tunemesh keys create --file`; default: the state dir's, "
                         "with a fresh key for each --tenants)")
    up.add_argument("--tenants", nargs="+", default=list(keys.DEFAULT_TENANTS), metavar="TENANT",
                    help="tenants a fresh state dir makes a key for (default: alice bob)")
    up.add_argument("--data-dir", type=Path, default=None,
                    help="model cache shared by trainers (default $TUNEMESH_DATA_DIR or ~/.cache/tunemesh)")
    up.add_argument("--samplers", type=int, default=1, help="sampler processes (default 1; 0: no sampling)")
    up.add_argument("--sampler-engine", default="auto", choices=["auto", "vllm", "torch"],
                    help="generation engine of the samplers (default auto: vLLM where it can serve the model)")
    up.add_argument("--models-file", type=Path, default=None,
                    help='JSON list of local models to serve besides the built-ins, [{"name": ..., "path": ...}] '
                         "(passed to trainers and samplers as --models-file)")
    for role in ("trainer", "sampler"):
        up.add_argument(f"--{role}-device", default=None, metavar="DEVICE",
                        help=f"{role}s' torch device: cpu, cuda, cuda:N or auto (default: the {role}'s, auto: "
                             "cuda when available, else cpu)")
    up.add_argument("--trainer-dtype", default=None, choices=["float32", "bfloat16"],
                    help="trainers' base model dtype (default: the trainer's, float32)")
    up.add_argument("--sampler-dtype", default=None, choices=["auto", "float32", "bfloat16"],
                    help="samplers' base model dtype (default: the sampler's, auto: bfloat16 on a GPU, float32 on CPU)")
    up.add_argument("--sampler-kv-cache-bytes", default=None, metavar="SIZE",
                    help="samplers' vLLM KV cache on CPU, in bytes or with a unit, e.g. 2GiB (default: the sampler's, "
                         "1GiB)")
    up.add_argument("--sampler-kv-cache-fraction", default=None, type=float, metavar="FRACTION",
                    help="samplers' vLLM on a GPU: share of the GPU's memory it takes, weights and KV cache "
                         "(default: the sampler's, 0.9)")
    up.add_argument("--checkpoint-dir", type=Path, default=None,
                    help="checkpoint store root (default <state dir>/checkpoints, kept across restarts)")
    up.add_argument("--schedulers", type=int, default=2,
                    help="scheduler replicas (default 2: one leads, one stands by to take over)")
    up.add_argument("--gateway", action=argparse.BooleanOptionalAction, default=True,
                    help="the Tinker HTTP gateway, for the official tinker SDK and tinker-cookbook (default: on; "
                         "--no-gateway leaves it out)")
    up.add_argument("--prometheus", action="store_true",
                    help="also start Prometheus (Debian's `prometheus`) scraping every service once a second")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for services (default 120)")
    up.add_argument("--insecure", action="store_true",
                    help="plaintext on every hop with no peer authentication, etcd without auth: development "
                         "only (default: TLS everywhere, certificates of a CA made in <state dir>/tls)")
    stat = commands.add_parser("status", help="show processes, registered trainers and placements")
    stat.add_argument("--json", action="store_true", help="machine-readable output")
    down = commands.add_parser("down", help="stop every process of the mesh")
    down.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    for sub in (up, stat, down):
        sub.add_argument("--state-dir", type=Path, default=None,
                         help=f"state directory (default ${state.STATE_DIR_ENV} or ~/.tunemesh/local)")
    checkpoints_cli.add_parser(commands)
    keys.add_parser(commands)
    tokenizers_cli.add_parser(commands)
    return parser


def main(argv: list[str] | None = None, services: ServiceFactory = launcher.default_services) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "checkpoints":
        return checkpoints_cli.run(args)
    if args.command == "keys":
        return keys.run(args)
    if args.command == "tokenizers":
        return tokenizers_cli.run(args)
    state_dir = (args.state_dir or state.default_state_dir()).expanduser()
    try:
        if args.command == "up":
            return _up(args, state_dir, services)
        if args.command == "status":
            return _status(args, state_dir)
        return _down(args, state_dir)
    except TunemeshError as err:
        print(f"tunemesh {args.command}: {err.message}", file=sys.stderr)
        return 1


def _up(args: argparse.Namespace, state_dir: Path, services: ServiceFactory) -> int:
    config = MeshConfig(state_dir=state_dir, trainers=args.trainers, models=tuple(args.models),
                        api_keys_file=args.api_keys_file, tenants=tuple(args.tenants), ready_timeout=args.timeout,
                        data_dir=args.data_dir,
                        checkpoint_dir=args.checkpoint_dir, samplers=args.samplers, sampler_engine=args.sampler_engine,
                        trainer_ranks=args.trainer_ranks, trainer_expert_parallel=args.trainer_expert_parallel,
                        prometheus=args.prometheus, schedulers=args.schedulers, models_file=args.models_file,
                        trainer_device=args.trainer_device, trainer_dtype=args.trainer_dtype,
                        sampler_device=args.sampler_device, sampler_dtype=args.sampler_dtype,
                        sampler_kv_cache_bytes=args.sampler_kv_cache_bytes,
                        sampler_kv_cache_fraction=args.sampler_kv_cache_fraction, insecure=args.insecure,
                        gateway=args.gateway)
    print(f"starting etcd, a checkpoint service, {config.trainers} trainer(s), {config.samplers} sampler(s), "
          f"{config.schedulers} scheduler replica(s){' and the Tinker gateway' if config.gateway else ''} "
          f"(state: {state_dir}) ...", flush=True)
    mesh = launcher.up(config, services)
    print(describe_up(mesh, state_dir_flag=args.state_dir is not None))
    return 0


def describe_up(mesh: MeshState, state_dir_flag: bool) -> str:
    """What to tell the user once the mesh is up."""
    tenant_keys = launcher.client_keys(mesh)
    suffix = f" --state-dir {mesh.state_dir}" if state_dir_flag else ""
    if tenant_keys:
        tenant, key = next(iter(tenant_keys.items()))
        key_lines = [f"  export TUNEMESH_API_KEY={key}    # tenant {tenant}",
                     f"API keys of {', '.join(tenant_keys)}: {Path(mesh.state_dir) / keys.CLIENT_KEYS_FILE} "
                     f"(hashed for the scheduler in {mesh.api_keys_file})"]
    else:
        key_lines = ["  export TUNEMESH_API_KEY=<a key of yours>",
                     f"API keys: {mesh.api_keys_file}"]
    rows = [f"  {p.name:<12} {p.address or '-':<22} pid {p.pid}" for p in mesh.processes]
    return "\n".join([
        "tunemesh mesh is up:", *rows, "",
        "Connect with:",
        f"  export TUNEMESH_ADDRESS={mesh.scheduler_address}",
        *([f"  export TUNEMESH_CA_BUNDLE={mesh.ca_file}    # TLS: the mesh CA"] if mesh.ca_file else
          ["  # plaintext (--insecure): development only"]),
        *key_lines,
        *tinker_lines(mesh),
        f"More keys: tunemesh keys create --tenant T{suffix}    (list, revoke: no restart needed)",
        f"Logs: {Path(mesh.state_dir) / 'logs'}",
        *([f"Prometheus: {mesh.prometheus_url} (config {Path(mesh.state_dir) / 'prometheus.yml'})"]
          if mesh.prometheus_url else []),
        f"Checkpoints: tunemesh checkpoints list{suffix}",
        f"Status: tunemesh status{suffix}    Stop: tunemesh down{suffix}",
    ])


def tinker_lines(mesh: MeshState) -> list[str]:
    """How the official tinker SDK reaches the mesh's gateway (none without one). The SDK's
    HTTP client (httpx) reads the CA bundle from SSL_CERT_FILE, which replaces its default
    roots in that process."""
    if not mesh.gateway_url:
        return []
    return ["Official tinker SDK / tinker-cookbook (through the gateway):",
            f"  export TINKER_BASE_URL={mesh.gateway_url}",
            "  export TINKER_API_KEY=$TUNEMESH_API_KEY    # the same API keys",
            *([f"  export SSL_CERT_FILE={mesh.ca_file}    # httpx trusts the mesh CA (instead of its default roots)"]
              if mesh.ca_file else [])]


def _status(args: argparse.Namespace, state_dir: Path) -> int:
    mesh = state.load(state_dir)
    if mesh is None:
        print(f"no mesh recorded in {state_dir} (start one with `tunemesh up`)", file=sys.stderr)
        return 1
    view = status.collect_status(mesh)
    print(status.to_json(view) if args.json else status.render_status(view))
    return 0 if all(p["alive"] for p in view["processes"]) else 2


def _down(args: argparse.Namespace, state_dir: Path) -> int:
    mesh = launcher.down(state_dir, grace=args.grace)
    if mesh is None:
        print(f"no mesh recorded in {state_dir}; nothing to stop")
        return 0
    print(f"stopped {len(mesh.processes)} process(es) of the mesh in {state_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
