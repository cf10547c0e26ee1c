"""Smoke probe of a built image: start one tunemesh service, wait for its ready file, ask
`grpc.health.v1` for SERVING, stop it with SIGTERM.

    python probe.py [--timeout S] tunemesh_checkpoint --root-dir {work}/store

`{work}` in the service's flags becomes a fresh scratch directory. scripts/build_images.py
mounts this file read-only into each image it smoke-tests (it is not part of any image);
it runs with the image's own Python, so it needs only grpcio and grpcio-health-checking,
which every image has. Exits 0 when the service answered SERVING and stopped cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

LOOPBACK = "127.0.0.1,localhost"


def wait_ready(proc: subprocess.Popen, ready: pathlib.Path, timeout_s: float) -> dict:
    """The ready file's content once the service serves (a standby scheduler's file says
    role "standby" until it leads)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"probe: the service exited with {proc.returncode} before it was ready")
        if ready.exists():
            content = json.loads(ready.read_text())
            if content.get("role", "leader") != "standby":
                return content
        time.sleep(0.2)
    raise SystemExit(f"probe: no ready file after {timeout_s:.0f} s")


def health(address: str) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -signal.SIGKILL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the ready file")
    parser.add_argument("module", help="e.g. tunemesh_checkpoint")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="the service's flags")
    args = parser.parse_args(argv)
    os.environ.update(no_proxy=LOOPBACK, NO_PROXY=LOOPBACK)  # http_proxy would capture loopback gRPC
    work = pathlib.Path(tempfile.mkdtemp(prefix="probe-"))
    ready = work / "ready.json"
    flags = [flag.replace("{work}", str(work)) for flag in args.flags]
    command = [sys.executable, "-m", args.module, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
               "--ready-file", str(ready), *flags]
    proc = subprocess.Popen(command)
    try:
        address = wait_ready(proc, ready, args.timeout)["address"]
        status = health(address)
        print(f"probe: {args.module} at {address}: {status}", flush=True)
    finally:
        code = stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    if status != "SERVING" or code != 0:
        print(f"probe: {args.module} answered {status}, exited with {code}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
