"""`python -m tunemesh_gateway` stops cleanly on SIGTERM (what Kubernetes and `tunemesh down`
send): uvicorn's graceful shutdown, then the gateway's own cleanup, then exit code 0 (uvicorn
raises the SIGTERM again after its shutdown; unhandled, it killed the process first)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path


def test_sigterm_stops_the_gateway_with_its_cleanup_and_exit_code_0(tmp_path: Path) -> None:
    ready, log = tmp_path / "ready.json", tmp_path / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tunemesh_gateway", "--listen", "127.0.0.1:0", "--scheduler", "127.0.0.1:9",
             "--insecure", "true", "--ready-file", str(ready), "--metrics-listen", "127.0.0.1:0"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        assert json.loads(ready.read_text())["pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert log.read_text().rstrip().endswith("gateway stopped")  # the cleanup after uvicorn ran


def test_connections_of_the_gateway_s_socket_send_without_nagle() -> None:
    """The listening socket says it is TCP, so asyncio (uvicorn's transport) sets TCP_NODELAY
    on every connection: otherwise each response on a kept-alive connection waits ~40 ms for
    the client's delayed ACK (Nagle holding the body behind the headers)."""
    import asyncio
    import socket

    from tunemesh_gateway.__main__ import bind

    async def accepted_nodelay() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Record(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        sock = bind("127.0.0.1:0")
        server = await asyncio.get_running_loop().create_server(Record, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(accepted_nodelay()) != 0
