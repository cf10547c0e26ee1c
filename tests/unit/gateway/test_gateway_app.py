"""The HTTP face in process (FastAPI's TestClient, a scripted scheduler): statuses and
bodies as the SDK reads them, content negotiation, unsupported endpoints."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from gateway_fakes import FakeUpstream
from fastapi.testclient import TestClient
from tinker import types as tt
from tinker.proto import response_conv

from tunemesh import tensors
from tunemesh.errors import AlreadyExistsError, UnavailableError
from tunemesh.v1 import checkpoints_pb2, operations_pb2, training_pb2
from tunemesh_gateway.app import create_app
from tunemesh_gateway.core import CoreConfig
from tunemesh_gateway.store import MemoryStore

MODEL = "5d1c:train:0"
KEY = {"X-API-Key": "tml-alice"}


@pytest.fixture
def client(upstream: FakeUpstream):
    store = MemoryStore()
    asyncio.run(store.put_model(MODEL, "runs/r1"))
    with TestClient(create_app(lambda: upstream, store, CoreConfig(poll_wait_s=0.05))) as client:
        yield client


@pytest.mark.parametrize("method, path", [
    ("POST", f"/api/v1/training_runs/{MODEL}/checkpoints/weights/x/publish"),
    ("POST", "/api/v1/save_weights_external"), ("GET", "/api/v1/sessions"), ("POST", "/api/v1/retrieve_futures"),
    ("GET", "/api/v1/create_model")])
def test_endpoints_tunemesh_lacks_are_400_unsupported(client, method, path):
    response = client.request(method, path, headers=KEY, json={})
    assert response.status_code == 400
    assert response.json() == {"detail": f"unsupported: {method} {path}"}


def test_the_key_is_required_and_forwarded(client, upstream):
    upstream.handlers["HeartbeatSession"] = lambda r: None
    assert client.post("/api/v1/session_heartbeat", json={"session_id": "s"}).status_code == 401
    response = client.post("/api/v1/session_heartbeat", headers=KEY, json={"session_id": "s", "type": "session_heartbeat"})
    assert response.status_code == 200 and upstream.keys == ["tml-alice"]


def test_scheduler_errors_become_json_statuses_the_sdk_does_not_retry_forever(client, upstream):
    def exists(request):
        raise AlreadyExistsError("CHECKPOINT_EXISTS", "name taken")

    def down(request):
        raise UnavailableError("NO_LEADER", "electing")

    upstream.handlers["SaveState"] = exists
    upstream.handlers["Forward"] = lambda r: training_pb2.ForwardResponse(operation=operations_pb2.Operation(name="operations/f"))
    response = client.post("/api/v1/save_weights", headers=KEY, json={"model_id": MODEL, "path": "a", "seq_id": 2})
    assert (response.status_code, response.json()) == (400, {"detail": "CHECKPOINT_EXISTS: name taken"})
    upstream.handlers["GetTrainingRun"] = down
    response = client.get(f"/api/v1/training_runs/{MODEL}", headers=KEY)
    assert response.status_code == 503 and response.json()["detail"] == "NO_LEADER: electing"
    assert upstream.requests("GetTrainingRun")[0].name == "runs/r1"  # a model id with colons in the path


def test_bad_bodies_are_400_with_a_detail(client):
    response = client.post("/api/v1/optim_step", headers=KEY, content=b"{not json")
    assert response.status_code == 400 and response.json()["detail"].startswith("invalid request")
    response = client.post("/api/v1/forward_backward", headers={**KEY, "Content-Type": "application/x-protobuf"},
                           content=b"\xff\xff\xff")
    assert response.status_code == 400 and "protobuf" in response.json()["detail"]


def test_retrieve_future_answers_protobuf_when_accepted_and_json_otherwise(client, upstream):
    def wait(request):
        op = operations_pb2.Operation(name=request.name, done=True)
        op.forward_backward.outputs.add().loss_fn_outputs["logprobs"].CopyFrom(
            tensors.encode(np.array([-0.5, -2.0], np.float32)))
        op.forward_backward.metrics["loss:sum"] = 2.5
        return operations_pb2.WaitOperationResponse(operation=op)

    upstream.handlers["WaitOperation"] = wait
    upstream.handlers["OptimStep"] = lambda r: training_pb2.OptimStepResponse(operation=operations_pb2.Operation(name="operations/o"))
    submitted = client.post("/api/v1/optim_step", headers=KEY, json={
        "model_id": MODEL, "seq_id": 1, "type": "optim_step", "adam_params": tt.AdamParams().model_dump()}).json()
    body = {"request_id": submitted["request_id"], "allow_metadata_only": True}
    proto = client.post("/api/v1/retrieve_future", headers={**KEY, "Accept": "application/x-protobuf"}, json=body)
    assert proto.headers["content-type"] == "application/x-protobuf"
    read = response_conv.deserialize_forward_backward_output(proto.content)
    assert read.loss_fn_outputs[0]["logprobs"].tolist() == [-0.5, -2.0] and read.metrics == {"loss:sum": 2.5}
    as_json = client.post("/api/v1/retrieve_future", headers=KEY, json=body)
    assert as_json.json()["loss_fn_outputs"][0]["logprobs"]["data"] == [-0.5, -2.0]


def test_session_free_endpoints_and_metrics(client):
    assert client.post("/api/v1/telemetry", headers=KEY, json={"events": []}).json() == {"status": "accepted"}
    config = tt.ClientDynamicConfigResponse.model_validate(
        client.post("/api/v1/client/dynamic_config", headers=KEY, json={"sdk_version": "0.38.0"}).json())
    assert not config.sample_cancel_enabled
    client.post("/api/v1/nope", headers=KEY)
    scraped = client.get("/metrics").text
    assert 'tunemesh_gateway_requests_total{endpoint="/api/v1/telemetry",status="200"} 1.0' in scraped
    assert 'endpoint="unsupported",status="400"' in scraped


def test_the_ttl_range_is_tinkers(client, upstream):
    upstream.handlers["UpdateCheckpointTtl"] = lambda r: None
    path = f"/api/v1/training_runs/{MODEL}/checkpoints/weights/ck/ttl"
    assert client.put(path, headers=KEY, json={"ttl_seconds": 60}).status_code == 400
    assert client.put(path, headers=KEY, json={"ttl_seconds": None}).status_code == 200
    assert client.put(path, headers=KEY, json={"ttl_seconds": 7200}).status_code == 200
    assert [(r.path, r.ttl_seconds) for r in upstream.requests("UpdateCheckpointTtl")] == [
        ("tunemesh://runs/r1/state/ck", 0), ("tunemesh://runs/r1/state/ck", 7200)]


def test_checkpoint_lists_page_with_a_cursor(client, upstream):
    pages = {"": (["a", "b"], "t1"), "t1": (["c"], "")}

    def listed(request):
        names, token = pages[request.page_token]
        return checkpoints_pb2.ListCheckpointsResponse(next_page_token=token, checkpoints=[
            checkpoints_pb2.Checkpoint(path=f"tunemesh://runs/r1/sampler/{n}", kind=checkpoints_pb2.CHECKPOINT_KIND_SAMPLER)
            for n in names])

    upstream.handlers["ListCheckpoints"] = listed
    page = tt.CheckpointsListResponse.model_validate(
        client.get("/api/v1/checkpoints", headers=KEY, params={"limit": 2, "offset": 1}).json())
    assert [c.tinker_path for c in page.checkpoints] == [f"tinker://{MODEL}/sampler_weights/{n}" for n in "bc"]
    assert (page.cursor.offset, page.cursor.limit, page.cursor.total_count) == (1, 2, 3)


def test_refused_keys_are_remembered_and_a_guessing_client_waits_while_others_go_on(client, upstream):
    from tunemesh.errors import UnauthenticatedError

    def check(request):
        if upstream.keys[-1] != "tml-alice":
            raise UnauthenticatedError("BAD_API_KEY", "unknown key")

    upstream.handlers["HeartbeatSession"] = check
    beat = {"session_id": "s", "type": "session_heartbeat"}
    bad = {"X-API-Key": "tml-guess-0"}
    assert client.post("/api/v1/session_heartbeat", headers=bad, json=beat).status_code == 401
    assert client.post("/api/v1/session_heartbeat", headers=bad, json=beat).status_code == 401  # remembered
    assert upstream.keys.count("tml-guess-0") == 1  # the scheduler saw it once
    statuses = [client.post("/api/v1/session_heartbeat", headers={"X-API-Key": f"tml-guess-{i}"}, json=beat).status_code
                for i in range(1, 5)]
    assert statuses == [401, 401, 401, 429]  # the 4th failure from this address: it waits
    assert len([k for k in upstream.keys if k.startswith("tml-guess")]) == 4  # under the scheduler's 10
    guard = client.app.state.keys
    assert guard.wait_s("another-client", 0.0) == 0.0  # a throttle per client address


def test_the_key_guard_forgets_refused_keys_after_a_while():
    from tunemesh_gateway.key_guard import KeyGuard

    guard = KeyGuard(remember_s=10.0, max_keys=2)
    guard.refused("c1", "tml-a", now=0.0)
    assert guard.known_bad("tml-a", 5.0) and not guard.known_bad("tml-a", 11.0)
    guard.refused("c2", "tml-b", now=1.0)
    guard.refused("c2", "tml-c", now=2.0)
    assert not guard.known_bad("tml-a", 3.0) and guard.known_bad("tml-c", 3.0)  # bounded: oldest forgotten
    assert guard.wait_s("c1", 0.0) == 0.0


def test_with_the_keys_file_bad_keys_never_reach_the_scheduler_however_many_clients_guess(upstream, tmp_path):
    """KeyCheck: keys verified at the gateway (the mesh's keys file), so guesses from any
    number of clients, in parallel or not, cost the scheduler nothing and cannot get the
    gateway's one address throttled there; each client is throttled here on its own."""
    import httpx

    from tunemesh_common.service import api_keys
    from tunemesh_common.service.throttle import FailureThrottle
    from tunemesh_gateway.key_guard import KeyCheck

    fast = api_keys.Kdf(n=1 << 10, r=8, p=1)
    alice, record = api_keys.new_key("alice", kdf=fast)
    api_keys.write_key_file(tmp_path / "keys.json", [record])
    check = KeyCheck(api_keys.KeyAuthenticator(api_keys.KeyRing(tmp_path / "keys.json"),
                                               FailureThrottle(max_failures=3, window_s=60, block_s=60)))
    upstream.handlers["HeartbeatSession"] = lambda r: None
    app = create_app(lambda: upstream, MemoryStore(), CoreConfig(poll_wait_s=0.05), keys=check)
    beat = {"session_id": "s", "type": "session_heartbeat"}

    async def scenario():
        async def post(client: str, key: str) -> int:
            transport = httpx.ASGITransport(app=app, client=(client, 1234))
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
                response = await http.post("/api/v1/session_heartbeat", headers={"X-API-Key": key}, json=beat)
                return response.status_code

        async with app.router.lifespan_context(app):
            guesses = [alice[:-4] + f"{i:04d}" for i in range(8)]
            parallel = await asyncio.gather(*(post("10.0.0.66", g) for g in guesses))  # one client, all at once
            many = [await post(f"10.0.1.{i}", g) for i, g in enumerate(guesses)]  # many clients, a guess each
            mine = await post("10.0.0.66", alice)  # a good key from the guessing address still waits
            theirs = await post("10.0.0.7", alice)
            return parallel, many, mine, theirs

    parallel, many, mine, theirs = asyncio.run(scenario())
    assert sorted(parallel) == [401] * 3 + [429] * 5
    assert many == [401] * 8
    assert (mine, theirs) == (429, 200)
    assert upstream.keys == [alice]  # the scheduler saw only the key that verified


def test_a_key_the_scheduler_refuses_after_the_gateway_admitted_it_is_verified_again_and_counted(tmp_path):
    """KeyCheck.refused: the key was revoked in the scheduler's copy of the file first."""
    from tunemesh_common.service import api_keys
    from tunemesh_common.service.throttle import FailureThrottle
    from tunemesh_gateway.key_guard import KeyCheck
    import time

    from tunemesh_gateway.status import HttpError

    fast = api_keys.Kdf(n=1 << 10, r=8, p=1)
    alice, record = api_keys.new_key("alice", kdf=fast)
    api_keys.write_key_file(tmp_path / "keys.json", [record])
    calls = []
    real = api_keys.KeyRecord.matches
    throttle = FailureThrottle(max_failures=2, window_s=60, block_s=60)
    check = KeyCheck(api_keys.KeyAuthenticator(api_keys.KeyRing(tmp_path / "keys.json"), throttle))

    async def scenario():
        now = time.monotonic()  # the authenticator's clock
        api_keys.KeyRecord.matches = lambda self, key: calls.append(key) or real(self, key)
        try:
            await check.admit(alice, "c1", now)
            await check.admit(alice, "c1", now)  # remembered: no second KDF
            check.refused("c1", alice, now)
            await check.admit(alice, "c1", now)  # verified again
            check.refused("c1", alice, now)  # the second refusal blocks the client
            with pytest.raises(HttpError) as blocked:
                await check.admit(alice, "c1", now)
            return blocked.value.status
        finally:
            api_keys.KeyRecord.matches = real

    assert asyncio.run(scenario()) == 429
    assert calls == [alice, alice]
