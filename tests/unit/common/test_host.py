"""host.py: a real grpc.aio server and /metrics endpoint on loopback, started and stopped
by the service host; the order of shutdown is observed from outside (health answers,
refused connections), not from the host's own bookkeeping."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from tunemesh_common.service import rpc
from tunemesh_common.service.host import HostConfig, ServiceHost

SERVICE = "tunemesh.test.Probe"


def _add_probe(servicer, server: grpc.aio.Server) -> None:
    """A generated `add_..._to_server` stand-in: Echo returns its request."""

    async def echo(request: bytes, context) -> bytes:
        return request

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))


def _config(tmp_path: Path, **overrides) -> HostConfig:
    fields = dict(service="probe", listen="127.0.0.1:0", metrics_listen="127.0.0.1:0",
                  ready_file=tmp_path / "ready.json", registry=CollectorRegistry(), grace_s=0.5)
    return HostConfig(**{**fields, **overrides})


async def _health(address: str, service: str = SERVICE) -> str:
    """The health status of `service` at `address`, or the status code of a failed call."""
    async with grpc.aio.insecure_channel(address, options=rpc.CHANNEL_OPTIONS) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.aio.AioRpcError as err:
            return err.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def _scrape(url: str) -> str:
    """"200" when /metrics at `url` answers, "refused" when nothing listens there."""
    host, port = url.removeprefix("http://").split("/", 1)[0].rsplit(":", 1)
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
    except ConnectionRefusedError:
        return "refused"
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    status = (await reader.readline()).split()[1].decode()
    writer.close()
    return status


@contextlib.asynccontextmanager
async def _recorded(events: list, name: str, host_of=None, fail: bool = False):
    """A registration: records its entry and exit (and what health said at its exit)."""
    if fail:
        events.append(f"{name} failed")
        raise RuntimeError(f"{name}: etcd unreachable")
    events.append(f"{name} entered")
    try:
        yield
    finally:
        events.append(f"{name} undone, health {await _health(host_of().address, '')}")


def test_serves_then_stops_in_reverse_order(tmp_path: Path) -> None:
    events: list[str] = []

    async def scenario() -> dict:
        host = ServiceHost(_config(tmp_path))
        async with host:
            host.add_servicer(_add_probe, None, SERVICE)
            await host.start()
            events.append(f"started, health {await _health(host.address)}")
            host.on_stop(lambda: events.append("older resource closed"))
            host.on_stop(lambda: _after_server(host))
            await host.serve([_recorded(events, "registration", lambda: host)], ready={"node_id": "n1"})
            events.append(f"serving, health {await _health(host.address)}")
            ready = json.loads((tmp_path / "ready.json").read_text())
            host.spawn(_until_cancelled(events), "probe-task")
            await asyncio.sleep(0)
            host.stop()
            assert await host.wait() is None
        events.append(f"closed, server {await _health(host.address)}, metrics {await _scrape(host.metrics_url)}")
        return ready

    async def _after_server(host: ServiceHost) -> None:
        events.append(f"server stopped: {await _health(host.address)}, metrics {await _scrape(host.metrics_url)}")

    ready = asyncio.run(scenario())
    assert set(ready) == {"address", "pid", "node_id", "metrics_url"}
    assert ready["pid"] == os.getpid() and ready["node_id"] == "n1"
    assert ready["address"].startswith("127.0.0.1:") and not ready["address"].endswith(":0")
    assert ready["metrics_url"].startswith("http://127.0.0.1:")
    assert events == [
        "started, health NOT_SERVING",
        "registration entered",
        "serving, health SERVING",
        "task cancelled",
        "registration undone, health NOT_SERVING",  # NOT_SERVING first, the server still up
        "server stopped: UNAVAILABLE, metrics 200",  # resources after the server, the latest first
        "older resource closed",
        "closed, server UNAVAILABLE, metrics refused",  # the metrics endpoint last
    ]


async def _until_cancelled(events: list) -> None:
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        events.append("task cancelled")
        raise


def test_a_failing_registration_stops_everything_and_writes_no_ready_file(tmp_path: Path) -> None:
    events: list[str] = []
    seen = {}

    async def scenario() -> None:
        host = ServiceHost(_config(tmp_path))
        try:
            async with host:
                host.add_servicer(_add_probe, None, SERVICE)
                host.on_stop(lambda: events.append("resource closed"))
                await host.serve([_recorded(events, "first", lambda: host), _recorded(events, "second", fail=True)])
                host.spawn(_until_cancelled(events))  # never reached
        finally:
            seen["server"], seen["metrics"] = await _health(host.address), await _scrape(host.metrics_url)

    with pytest.raises(RuntimeError, match="second: etcd unreachable"):
        asyncio.run(scenario())
    assert events == ["first entered", "second failed", "first undone, health NOT_SERVING", "resource closed"]
    assert seen == {"server": "UNAVAILABLE", "metrics": "refused"}
    assert not (tmp_path / "ready.json").exists()


def test_a_failing_cleanup_does_not_skip_the_others(tmp_path: Path) -> None:
    events: list[str] = []
    seen = {}

    def broken() -> None:
        raise OSError("disk gone")

    async def scenario() -> None:
        host = ServiceHost(_config(tmp_path))
        try:
            async with host:
                host.on_stop(lambda: events.append("older resource closed"))
                host.on_stop(broken)
                await host.serve([_recorded(events, "registration", lambda: host)])
        finally:
            seen["server"], seen["metrics"] = await _health(host.address, ""), await _scrape(host.metrics_url)

    with pytest.raises(OSError, match="disk gone"):
        asyncio.run(scenario())
    assert events == ["registration entered", "registration undone, health NOT_SERVING", "older resource closed"]
    assert seen == {"server": "UNAVAILABLE", "metrics": "refused"}


def test_a_listen_address_in_use_closes_the_metrics_endpoint(tmp_path: Path) -> None:
    seen = {}

    async def scenario() -> None:
        async with ServiceHost(_config(tmp_path, metrics_listen="")) as taken:
            await taken.start()
            host = ServiceHost(_config(tmp_path, listen=taken.address))
            try:
                async with host:
                    await host.start()
            finally:
                seen["metrics"] = await _scrape(host.metrics_url)

    with pytest.raises(RuntimeError):
        asyncio.run(scenario())
    assert seen == {"metrics": "refused"}
    assert not (tmp_path / "ready.json").exists()


def test_sigterm_while_serving_stops_cleanly_and_restores_the_handler(tmp_path: Path) -> None:
    async def scenario() -> tuple:
        async with ServiceHost(_config(tmp_path)) as host:
            host.add_servicer(_add_probe, None, SERVICE)
            await host.serve()
            asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), signal.SIGTERM)
            woke = await host.wait(asyncio.Event())
        return woke, await _health(host.address)

    assert asyncio.run(scenario()) == (None, "UNAVAILABLE")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_sigterm_during_start_up_ends_it_at_once(tmp_path: Path) -> None:
    events: list[str] = []

    async def scenario() -> str:
        async with ServiceHost(_config(tmp_path)) as host:
            host.on_stop(lambda: events.append("resource closed"))
            await host.start()
            asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), signal.SIGTERM)
            await asyncio.sleep(30)  # a model loading
            events.append("start-up went on")
        return await _health(host.address, "")

    started = time.monotonic()
    assert asyncio.run(scenario()) == "UNAVAILABLE"  # no exception: a clean stop
    assert time.monotonic() - started < 10
    assert events == ["resource closed"]
    assert not (tmp_path / "ready.json").exists()


def test_wait_returns_the_event_that_fired(tmp_path: Path) -> None:
    async def scenario():
        lost = asyncio.Event()
        async with ServiceHost(_config(tmp_path, metrics_listen="", handle_signals=False)) as host:
            await host.serve()
            asyncio.get_running_loop().call_later(0.05, lost.set)
            woke = await host.wait(lost)
        return woke is lost, host.metrics_url, json.loads((tmp_path / "ready.json").read_text())["metrics_url"]

    assert asyncio.run(scenario()) == (True, "", "")


def test_a_request_over_the_hosts_limit_is_refused_and_the_next_call_succeeds(tmp_path):
    """`max_receive_bytes`: gRPC refuses the oversized request from its length prefix;
    the SDK reads that as INVALID_ARGUMENT [REQUEST_TOO_LARGE]; the channel stays usable."""
    from tunemesh.errors import InvalidArgumentError, error_from_rpc

    async def main():
        async with ServiceHost(_config(tmp_path, max_receive_bytes=1 << 20, handle_signals=False)) as host:
            host.add_servicer(_add_probe, None, SERVICE)
            await host.serve()
            options = [("grpc.max_send_message_length", 4 << 20)]
            async with grpc.aio.insecure_channel(host.address, options=options) as channel:
                echo = channel.unary_unary(f"/{SERVICE}/Echo")
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await echo(bytes(2 << 20), timeout=10)
                assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                error = error_from_rpc(refused.value)
                assert isinstance(error, InvalidArgumentError) and error.reason == "REQUEST_TOO_LARGE"
                assert await echo(b"small", timeout=10) == b"small"

    asyncio.run(main())
