"""Training steps through the official Tinker SDK and the gateway vs tunemesh's own SDK.

    python bench/tinker_sdk.py                              # tiny-dense, 1 and 8 tenants
    python bench/tinker_sdk.py --model HuggingFaceTB/SmolLM2-135M-Instruct --tenants 1
    python bench/tinker_sdk.py --json bench/results/tinker_sdk.json

One mesh (etcd, one trainer, scheduler and the Tinker gateway, HTTPS with the mesh CA)
as `tunemesh up` starts it, on loopback. N tenants each run the same forward_backward(B x T tokens) + optim_step loop,
two steps in flight, once with `tunemesh.ServiceClient` over gRPC and once with
`tinker.ServiceClient` over HTTP through the gateway; the two alternate round by round
on the same mesh, so drift hits both. Figure: the gateway's median round time over the
native SDK's (aim <= 1.2). See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import ADAM, TINY, BenchMesh, Workload, log, sdk_datums, tenant_steps, timed_rounds, token_rows  # noqa: E402


def tinker_datums(rows: np.ndarray) -> list:
    from tinker import types

    return [types.Datum(model_input=types.ModelInput.from_ints(row[:-1].tolist()),
                        loss_fn_inputs={"target_tokens": row[1:].tolist(), "weights": [1.0] * (len(row) - 1)})
            for row in rows]


def native_runs(mesh: BenchMesh, vocab: int, workload: Workload, tenants: int) -> tuple[list, list]:
    import tunemesh

    services = [tunemesh.ServiceClient(mesh.address, api_key=mesh.keys[i]) for i in range(tenants)]
    runs = []
    for i, service in enumerate(services):
        client = service.create_lora_training_client(mesh.model, rank=workload.rank, seed=i)
        datums = sdk_datums(token_rows(vocab, workload.batch, workload.seq_len, workload.seed + i))
        runs.append(functools.partial(tenant_steps, client, datums, depth=workload.depth))
    return runs, services


def gateway_runs(mesh: BenchMesh, url: str, vocab: int, workload: Workload, tenants: int) -> tuple[list, list]:
    import tinker
    from tinker import types

    services = [tinker.ServiceClient(base_url=url, api_key=mesh.keys[i]) for i in range(tenants)]
    runs = []
    for i, service in enumerate(services):
        client = service.create_lora_training_client(base_model=mesh.model, rank=workload.rank, seed=i)
        client = client.result() if hasattr(client, "result") else client
        datums = tinker_datums(token_rows(vocab, workload.batch, workload.seq_len, workload.seed + i))
        runs.append(functools.partial(tenant_steps, client, datums, depth=workload.depth,
                                      adam=types.AdamParams(**ADAM)))
    return runs, services


def compare(mesh: BenchMesh, url: str, vocab: int, workload: Workload, tenants: int, rounds: int) -> dict:
    """`rounds` alternating rounds (native, then gateway) of every tenant's measured steps."""
    native, native_services = native_runs(mesh, vocab, workload, tenants)
    gateway, gateway_services = gateway_runs(mesh, url, vocab, workload, tenants)
    try:
        native_s, gateway_s = [], []
        for _ in range(rounds):
            native_s += timed_rounds(native, workload.warmup, workload.steps, 1)
            gateway_s += timed_rounds(gateway, workload.warmup, workload.steps, 1)
    finally:
        for service in native_services:
            service.close()
        for service in gateway_services:  # ends its session and its heartbeats
            service.close("success").result(timeout=60)
    ratios = [g / n for g, n in zip(gateway_s, native_s)]
    steps = workload.steps
    return {"tenants": tenants, "rounds": rounds,
            "native_step_ms_p50": round(float(np.median(native_s)) / steps * 1e3, 2),
            "gateway_step_ms_p50": round(float(np.median(gateway_s)) / steps * 1e3, 2),
            "gateway_over_native_p50": round(float(np.median(ratios)), 3),
            "round_ratios": [round(r, 3) for r in ratios], "gateway_clients": len(gateway_services)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=TINY)
    parser.add_argument("--tenants", default="1,8", help="comma-separated tenant counts")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per tenant per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="alternating native/gateway rounds")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("TUNEMESH_DATA_DIR", "~/.cache/tunemesh")).expanduser())
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    from tunemesh_common.models import ModelRegistry

    counts = [int(n) for n in args.tenants.split(",")]
    workload = Workload(args.batch, args.seq_len, args.steps, args.warmup, rank=8)
    vocab = ModelRegistry.default(args.data_dir).entry(args.model).vocab_size
    results = {"model": args.model, "workload": dataclasses.asdict(workload),
               "loadavg_before": os.getloadavg()[0], "rows": []}
    with tempfile.TemporaryDirectory(prefix="tunemesh-bench-") as state:
        with BenchMesh(args.model, args.data_dir, Path(state) / "mesh", max(counts)) as mesh:
            saved = os.environ.get("SSL_CERT_FILE")
            if mesh.mesh.ca_file:  # the official SDK's httpx trusts the mesh CA through this
                os.environ["SSL_CERT_FILE"] = mesh.mesh.ca_file
            try:
                for tenants in counts:
                    row = compare(mesh, mesh.mesh.gateway_url, vocab, workload, tenants, args.rounds)
                    log(f"{tenants} tenant(s): native {row['native_step_ms_p50']} ms/step, gateway "
                        f"{row['gateway_step_ms_p50']} ms/step, ratio {row['gateway_over_native_p50']}")
                    results["rows"].append(row)
            finally:
                if saved is None:
                    os.environ.pop("SSL_CERT_FILE", None)
                else:
                    os.environ["SSL_CERT_FILE"] = saved
    results["loadavg_after"] = os.getloadavg()[0]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
