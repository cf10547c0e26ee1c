"""Smoke probe of a built image: start one tunemesh service, wait for its ready file, ask
`grpc.health.v1` for SERVING (or, with --http, its HTTP endpoint for 200), stop it with SIGTERM.

    python probe.py [--timeout S] tunemesh_checkpoint --root-dir {work}/store
    python probe.py --upstream "tunemesh_scheduler --etcd 127.0.0.1:2379 ..." --http /healthz \
        tunemesh_gateway --scheduler {upstream} --insecure true

`{work}` in the service's flags becomes a fresh scratch directory. --upstream starts another
service first (its flags in one shell-quoted string, probed the same way over gRPC) and
`{upstream}` in the service's flags becomes its address; it is stopped last. --http PATH asks
`GET <the ready file's url>PATH` instead of gRPC, until it answers 200 or the timeout passes
(the gateway's /healthz answers 503 until its scheduler answers). Every service must stop
cleanly, with exit code 0.

scripts/build_images.py mounts this file read-only into each image it smoke-tests (it is not
part of any image); it runs with the image's own Python, so it needs only the standard library,
grpcio and grpcio-health-checking, which every image has. Exits 0 when the service (and the
upstream) answered SERVING / 200 and stopped cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

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


def http_status(url: str, deadline: float) -> str:
    """`GET url` until it answers 200 or `deadline` passes: "200 OK", else the last answer."""
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        try:
            with no_proxy.open(url, timeout=10) as reply:
                return f"{reply.status} {reply.reason}"
        except urllib.error.HTTPError as err:
            answer = f"{err.code} {err.reason}: {err.read().decode(errors='replace').strip()}"
        except OSError as err:
            answer = f"no answer ({err})"
        if time.monotonic() > deadline:
            return answer
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -signal.SIGKILL


@contextlib.contextmanager
def started(module: str, flags: list[str], work: pathlib.Path,
            codes: dict[str, int]) -> Iterator[tuple[subprocess.Popen, pathlib.Path]]:
    """`python -m module` on loopback ports and its ready file; stopped (SIGTERM) on leaving,
    its exit code then in codes[module]."""
    ready = work / f"{module}.ready.json"
    proc = subprocess.Popen([sys.executable, "-m", module, "--listen", "127.0.0.1:0", "--metrics-listen",
                             "127.0.0.1:0", "--ready-file", str(ready), *flags])
    try:
        yield proc, ready
    finally:
        codes[module] = stop(proc)


def probe(module: str, service: tuple[subprocess.Popen, pathlib.Path], timeout_s: float,
          http_path: str) -> tuple[str, bool]:
    """(address, whether it answered SERVING, or 200 on GET http_path) once `module` is ready."""
    deadline = time.monotonic() + timeout_s
    content = wait_ready(*service, timeout_s)
    status = http_status(content["url"] + http_path, deadline) if http_path else health(content["address"])
    print(f"probe: {module} at {content['address']}{http_path}: {status}", flush=True)
    return content["address"], status in ("SERVING", "200 OK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each service")
    parser.add_argument("--upstream", default="", help='a service started first: "MODULE FLAGS", shell-quoted')
    parser.add_argument("--http", default="", metavar="PATH", help="ask GET PATH for 200 instead of gRPC health")
    parser.add_argument("module", help="e.g. tunemesh_checkpoint")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="the service's flags")
    args = parser.parse_args(argv)
    os.environ.update(no_proxy=LOOPBACK, NO_PROXY=LOOPBACK)  # http_proxy would capture loopback gRPC
    work = pathlib.Path(tempfile.mkdtemp(prefix="probe-"))
    codes: dict[str, int] = {}
    try:
        with contextlib.ExitStack() as stack:
            upstream, ok = "", True
            if args.upstream:
                module, *flags = (f.replace("{work}", str(work)) for f in shlex.split(args.upstream))
                upstream, ok = probe(module, stack.enter_context(started(module, flags, work, codes)), args.timeout, "")
            if ok:
                flags = [f.replace("{work}", str(work)).replace("{upstream}", upstream) for f in args.flags]
                _, ok = probe(args.module, stack.enter_context(started(args.module, flags, work, codes)),
                              args.timeout, args.http)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stopped = all(code == 0 for code in codes.values())
    if not ok or not stopped:
        print(f"probe: {args.module}: {'answered' if ok else 'not serving'}, exit codes {codes}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
