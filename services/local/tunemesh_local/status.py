"""`tunemesh status`: the recorded processes, live figures from their metrics, plus what
etcd says (trainers, placements)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tunemesh_common.membership import leadership, registry
from tunemesh_common.security.tls import MeshTls
from tunemesh_local import live_figures, processes
from tunemesh_local.state import MeshState

ETCD_QUERY_TIMEOUT_S = 3.0


def collect_status(mesh: MeshState, timeout: float = ETCD_QUERY_TIMEOUT_S) -> dict:
    """A JSON-ready view of the mesh."""
    view = {
        "state_dir": mesh.state_dir,
        "etcd_endpoint": mesh.etcd_endpoint,
        "scheduler_address": mesh.scheduler_address,
        "gateway_url": mesh.gateway_url,
        "api_keys_file": mesh.api_keys_file,
        "prometheus_url": mesh.prometheus_url,
        "processes": [
            {"name": p.name, "role": p.role, "pid": p.pid, "alive": processes.is_alive(p.pid, p.start_time),
             "address": p.address, "metrics_url": p.metrics_url, "log": p.log_path}
            for p in mesh.processes
        ],
        "etcd": {"reachable": False, "error": ""},
        "live": live_figures.collect(mesh.processes),
        "trainers": [],
        "placements": {},
        "scheduler_leader": "",  # the leading replica's address, from its etcd leadership key
    }
    try:
        view["trainers"], view["placements"], view["scheduler_leader"] = asyncio.run(
            asyncio.wait_for(_query(mesh.etcd_endpoint, admin_tls(mesh)), timeout))
        view["etcd"]["reachable"] = True
    except (TimeoutError, ValueError, *registry.ETCD_ERRORS) as err:
        view["etcd"]["error"] = str(err) or type(err).__name__
    return view


def admin_tls(mesh: MeshState) -> MeshTls | None:
    """The admin certificate `tunemesh up` made (etcd's root user), None for an --insecure
    mesh; ValueError when its files are gone."""
    if not mesh.tls_dir:
        return None
    tls_dir = Path(mesh.tls_dir)
    return MeshTls.from_files(Path(mesh.ca_file), tls_dir / "admin.pem", tls_dir / "admin-key.pem")


async def _query(endpoint: str, tls: MeshTls | None) -> tuple[list[dict], dict[str, str], str]:
    from tunemesh_internal.v1 import trainer_pb2

    prefix = registry.node_prefix("trainers")
    async with registry.connect(endpoint, timeout=ETCD_QUERY_TIMEOUT_S, tls=tls) as client:
        nodes = [trainer_pb2.TrainerNode.FromString(kv.value) for kv in await client.get_prefix(prefix)]
        placements = await registry.PlacementTable(client).list_placements()
        leader = await client.get(leadership.leader_key("scheduler"))
    trainers = [
        {"node_id": n.node_id, "address": n.address, "models": [m.name for m in n.models],
         "adapters": n.adapters, "max_adapters": n.max_adapters, "metrics_url": n.metrics_url}
        for n in nodes
    ]
    return trainers, placements, leader.value.decode() if leader is not None else ""


def render_status(view: dict) -> str:
    """Readable tables."""
    lines = [f"state dir   {view['state_dir']}", f"scheduler   {view['scheduler_address'] or '-'}",
             *([f"gateway     {view['gateway_url']}"] if view.get("gateway_url") else []),
             f"etcd        {view['etcd_endpoint']} "
             + ("(reachable)" if view["etcd"]["reachable"] else f"(UNREACHABLE: {view['etcd']['error']})"),
             f"api keys    {view['api_keys_file']}"]
    if view.get("prometheus_url"):
        lines.append(f"prometheus  {view['prometheus_url']}")
    lines += [""] + _table(["PROCESS", "PID", "STATE", "ADDRESS"],
                           [[p["name"], str(p["pid"]), _state(p, view.get("scheduler_leader", "")),
                             p["address"] or "-"] for p in view["processes"]])
    lines += [""] + _table(["LIVE", "QUEUED", "TOKENS/S", "ADAPTERS", "METRICS"],
                           [[name, *_live_row(figures)] for name, figures in view.get("live", {}).items()])
    lines += [""] + _table(["TRAINER", "ADDRESS", "MODELS", "ADAPTERS"],
                           [[t["node_id"], t["address"], ",".join(t["models"]) or "-",
                             f"{t['adapters']}/{t['max_adapters']}"] for t in view["trainers"]])
    lines += [""] + _table(["RUN", "TRAINER"], [[run, node] for run, node in sorted(view["placements"].items())])
    return "\n".join(lines)


def _state(process: dict, leader: str) -> str:
    """up / DEAD, and for a scheduler replica whether it leads or stands by."""
    if not process["alive"]:
        return "DEAD"
    if process["role"] != "scheduler" or not leader:
        return "up"
    return "up (leader)" if process["address"] == leader else "up (standby)"


def _live_row(figures: dict) -> list[str]:
    """QUEUED, TOKENS/S, ADAPTERS and METRICS cells; "-" where a figure is unknown."""
    queued = figures.get("queued")
    if queued is not None and figures.get("queued_by_tenant"):
        tenants = ", ".join(f"{t} {v:g}" for t, v in sorted(figures["queued_by_tenant"].items()) if v)
        queued = f"{queued:g}" + (f" ({tenants})" if tenants else "")
    rate = figures.get("tokens_per_second")
    adapters, slots = figures.get("adapters"), figures.get("adapter_slots")
    return [queued if isinstance(queued, str) else _number(queued), "-" if rate is None else f"{rate:.1f}",
            "-" if adapters is None else f"{adapters:g}/{_number(slots)}", figures["metrics"]]


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        rows = [["(none)"] + [""] * (len(header) - 1)]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]


def to_json(view: dict) -> str:
    return json.dumps(view, indent=2, sort_keys=True)
