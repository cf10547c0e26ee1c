"""A stand-in service for launcher tests: honours --listen / --ready-file like the real ones.

--etcd with --node-id also registers a TrainerNode under a lease, over TLS as the node when
given --tls-ca / --tls-cert / --tls-key (as `tunemesh up` passes them).
--exit-code N exits at once after printing a line; --never-ready serves but writes no ready file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys


async def serve(args: argparse.Namespace) -> None:
    host, port = args.listen.rsplit(":", 1)
    sock = socket.socket()
    sock.bind((host, int(port)))
    sock.listen()
    address = f"{host}:{sock.getsockname()[1]}"
    registration = None
    if args.etcd and args.node_id:
        from tunemesh_internal.v1 import trainer_pb2
        from tunemesh.v1 import sessions_pb2
        from tunemesh_common.membership import registry

        node = trainer_pb2.TrainerNode(node_id=args.node_id, address=address, max_adapters=4, adapters=1,
                                       models=[sessions_pb2.SupportedModel(name=args.model or "tiny")])
        tls = None
        if args.tls_cert:
            from tunemesh_common.security.tls import MeshTls

            tls = MeshTls.from_files(args.tls_ca, args.tls_cert, args.tls_key)
        registration = await registry.NodeRegistration.start(
            args.etcd, "trainers", args.node_id, node.SerializeToString(), ttl=3, tls=tls)
    if not args.never_ready:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"address": address, "pid": os.getpid(), "metrics_url": ""}, f)
        os.replace(tmp, args.ready_file)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    if registration is not None:
        await registration.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--listen", "--ready-file", "--etcd", "--node-id", "--model", "--tls-ca", "--tls-cert", "--tls-key",
                 "--insecure"):
        parser.add_argument(flag)
    parser.add_argument("--exit-code", type=int)
    parser.add_argument("--never-ready", action="store_true")
    args = parser.parse_args()
    if args.exit_code is not None:
        print("fake service: failing on purpose with a clear reason", flush=True)
        sys.exit(args.exit_code)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
