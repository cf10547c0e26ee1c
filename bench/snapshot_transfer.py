"""CPU per MB of writing a checkpoint to the checkpoint service: streamed vs handed over.

    python bench/snapshot_transfer.py                      # 16 x 68 MB (a SmolLM2 rank-16 snapshot), 3 repeats
    python bench/snapshot_transfer.py --mb 68 --count 16 --repeats 3 --json bench/results/snapshot_transfer.json

A real checkpoint service process (`python -m tunemesh_checkpoint`, mutual TLS as
`tunemesh up` runs it, with a handoff directory) and, in this process, a trainer's
`CheckpointStorageClient` (a trainer's certificate) writing `--count` state checkpoints of
`--mb` MB each, float32 arrays in parts as a trainer's encoder gives them, at snapshot
paths. Each checkpoint is removed two writes later, as the scheduler collects a run's
older snapshots, so the page cache is reused as in a mesh. Modes, alternating:

- `stream`: WriteCheckpoint, 1 MiB chunks through gRPC and TLS;
- `handoff`: the files written into the handoff directory (hashed, fsync'd), then
  AdoptCheckpoint (the service takes them by rename).

Per mode, medians over `--repeats`: the service's CPU ms per MB (`/proc/PID/stat`), this
process's (the client's: its event loop, gRPC's threads, the writer thread) and wall ms
per MB. Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from price_probe import cpu_seconds  # noqa: E402
from train_throughput import log, write_json  # noqa: E402

from tunemesh_internal.v1 import checkpoint_pb2  # noqa: E402
from tunemesh_common.checkpoints.client import CheckpointStorageClient  # noqa: E402
from tunemesh_common.checkpoints.paths import SNAPSHOT_PREFIX  # noqa: E402
from tunemesh_common.membership.etcd_process import pick_free_port  # noqa: E402
from tunemesh_common.security.tls import MeshTls  # noqa: E402
from tunemesh_local.certs import MeshCerts  # noqa: E402

MODES = ("stream", "handoff")
TENANT = "alice"
FILE_NAMES = ("adapter_model.safetensors", "optimizer.safetensors")


def state_files(mb: int, seed: int = 0) -> dict[str, list]:
    """A state checkpoint of about `mb` MB: weights a third, optimizer state two thirds,
    each file as many arrays (one per LoRA factor, as the encoder hands them over)."""
    rng = np.random.default_rng(seed)
    per_array = (mb << 20) // 4 // 96
    arrays = [rng.standard_normal(per_array).astype(np.float32) for _ in range(96)]
    return {"adapter_config.json": [b'{"r": 16}\n'], FILE_NAMES[0]: arrays[:32], FILE_NAMES[1]: arrays[32:]}


def per_mb(seconds: float, mb: float) -> float:
    return round(seconds * 1e3 / mb, 3)


class Service:
    """The checkpoint service process, its root and a client's TLS material."""

    def __init__(self, root: Path) -> None:
        self.root = root
        certs = MeshCerts(root / "tls")
        self.address = f"127.0.0.1:{pick_free_port()}"
        ready = root / "ready.json"
        self.handoff = root / "store" / "handoff"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tunemesh_checkpoint", "--listen", self.address, "--root-dir", str(root / "store"),
             "--handoff-dir", str(self.handoff), "--ready-file", str(ready),
             *certs.issue("checkpoint", "checkpoint").flags()],
            stdout=(root / "checkpoint.log").open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the checkpoint service did not start: {(root / 'checkpoint.log').read_text()}")
            time.sleep(0.05)
        issued = certs.issue("trainer-0", "trainer", "trainer-0")
        self.tls = MeshTls.from_files(issued.ca, issued.cert, issued.key)

    def cpu_s(self) -> float:
        return cpu_seconds(f"/proc/{self.proc.pid}/stat")[0]

    def remove(self, path: str) -> None:
        """Delete a written checkpoint under the service (as the scheduler's collection would)."""
        name = path.rsplit("/", 1)[1]
        for found in (self.root / "store" / "objects" / TENANT).rglob(name):
            shutil.rmtree(found)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def measure(service: Service, mode: str, files: dict[str, list], count: int, tag: str) -> dict:
    client = CheckpointStorageClient(service.address, tls=service.tls,
                                     handoff_dir=service.handoff if mode == "handoff" else None)
    mb = sum(memoryview(p).nbytes for parts in files.values() for p in parts) / 2**20
    paths = [f"tunemesh://runs/{tag}/state/{SNAPSHOT_PREFIX}{i:012d}" for i in range(count)]
    service_0, client_0, wall_0 = service.cpu_s(), time.process_time(), time.monotonic()
    for index, path in enumerate(paths):
        header = checkpoint_pb2.WriteCheckpointHeader(path=path, base_model="bench", step=index, has_optimizer_state=True)
        await client.write(TENANT, header, files)
        if index >= 2:
            service.remove(paths[index - 2])
    service_s, client_s, wall_s = service.cpu_s() - service_0, time.process_time() - client_0, time.monotonic() - wall_0
    await client.close()
    for path in paths[-2:]:
        service.remove(path)
    total = mb * count
    return {"mode": mode, "mb": round(total, 1), "service_ms_per_mb": per_mb(service_s, total),
            "client_ms_per_mb": per_mb(client_s, total), "cpu_ms_per_mb": per_mb(service_s + client_s, total),
            "wall_ms_per_mb": per_mb(wall_s, total)}


def summarize(samples: list[dict]) -> dict:
    """Medians per mode, and handoff / stream for total CPU and wall."""
    out = {}
    for mode in MODES:
        rows = [s for s in samples if s["mode"] == mode]
        out[mode] = {key: round(float(np.median([r[key] for r in rows])), 3)
                     for key in ("service_ms_per_mb", "client_ms_per_mb", "cpu_ms_per_mb", "wall_ms_per_mb")}
    out["cpu_handoff_over_stream"] = round(out["handoff"]["cpu_ms_per_mb"] / out["stream"]["cpu_ms_per_mb"], 3)
    out["wall_handoff_over_stream"] = round(out["handoff"]["wall_ms_per_mb"] / out["stream"]["wall_ms_per_mb"], 3)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=68, help="size of one checkpoint, MB")
    p.add_argument("--count", type=int, default=16, help="checkpoints written per measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurements per mode (alternating)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    files = state_files(args.mb)
    samples = []
    with tempfile.TemporaryDirectory(prefix="tunemesh-transfer-") as tmp:
        service = Service(Path(tmp))
        try:
            for repeat in range(args.repeats):
                for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
                    sample = asyncio.run(measure(service, mode, files, args.count, f"r{repeat}{mode}"))
                    log(json.dumps(sample))
                    samples.append(sample)
        finally:
            service.stop()
    result = {"bench": "snapshot_transfer", "checkpoint_mb": args.mb, "count": args.count, "repeats": args.repeats,
              "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0], "samples": samples,
              "summary": summarize(samples)}
    log(json.dumps(result["summary"]))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
