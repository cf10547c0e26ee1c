"""RestClient (Tinker's runs-and-checkpoints client) over tunemesh's calls, and AdminClient."""

from __future__ import annotations

import asyncio
import datetime

import grpc
import pytest
from sdk_fakes import FakeChannel, FakeRpcError
from training_fakes import FAST

import tunemesh
from tunemesh.v1 import checkpoints_pb2, sessions_pb2, training_pb2, types_pb2

RUNS = [f"runs/r{i}" for i in range(5)]


def _run(name: str) -> training_pb2.TrainingRun:
    return training_pb2.TrainingRun(
        name=name, base_model="tiny-dense", lora_config=types_pb2.LoraConfig(rank=8, train_mlp=True),
        step=3, user_metadata={"renderer_name": "qwen3", "of": name},
    )


def _checkpoint(path: str, seconds: int) -> checkpoints_pb2.Checkpoint:
    parts = path.removeprefix("tunemesh://").split("/")
    kind = {"state": checkpoints_pb2.CHECKPOINT_KIND_STATE, "sampler": checkpoints_pb2.CHECKPOINT_KIND_SAMPLER}
    msg = checkpoints_pb2.Checkpoint(
        path=path, kind=kind.get(parts[-2], checkpoints_pb2.CHECKPOINT_KIND_IMPORTED),
        run="/".join(parts[:2]) if parts[0] == "runs" else "", name=parts[-1], base_model="tiny-dense",
        lora_config=types_pb2.LoraConfig(rank=8, train_attn=True, train_unembed=False),
    )
    msg.create_time.FromSeconds(seconds)
    return msg


CHECKPOINTS = [_checkpoint("tunemesh://runs/r1/state/old", 100), _checkpoint("tunemesh://runs/r1/sampler/new", 300),
               _checkpoint("tunemesh://runs/r2/state/mid", 200), _checkpoint("tunemesh://imports/mine", 50)]


def _page(items: list, request, field: str, response_cls, size: int = 2):
    start = int(request.page_token or 0)
    end = start + size
    return response_cls(**{field: items[start:end]}, next_page_token=str(end) if end < len(items) else "")


def _get_run(request, metadata):
    if request.name not in RUNS:
        raise FakeRpcError(grpc.StatusCode.NOT_FOUND, f"no run {request.name}", reason="RUN_NOT_FOUND")
    return training_pb2.GetTrainingRunResponse(run=_run(request.name))


def _get_checkpoint(request, metadata):
    found = [c for c in CHECKPOINTS if c.path == request.path]
    return checkpoints_pb2.GetCheckpointResponse(checkpoint=found[0])


HANDLERS = {
    "GetCapabilities": lambda r, m: sessions_pb2.GetCapabilitiesResponse(
        models=[sessions_pb2.SupportedModel(name="tiny-dense")]),
    "GetTrainingRun": _get_run,
    "ListTrainingRuns": lambda r, m: _page([_run(n) for n in RUNS], r, "runs", training_pb2.ListTrainingRunsResponse),
    "ListCheckpoints": lambda r, m: _page([c for c in CHECKPOINTS if not r.run or c.run == r.run], r, "checkpoints",
                                          checkpoints_pb2.ListCheckpointsResponse),
    "GetCheckpoint": _get_checkpoint,
    "DeleteCheckpoint": lambda r, m: checkpoints_pb2.DeleteCheckpointResponse(),
    "UpdateCheckpointTtl": lambda r, m: checkpoints_pb2.UpdateCheckpointTtlResponse(checkpoint=CHECKPOINTS[0]),
}


@pytest.fixture()
def channel():
    return FakeChannel(HANDLERS)


@pytest.fixture()
def rest(channel):
    with tunemesh.ServiceClient("fake:1", "k", retry_policy=FAST, channel=channel) as service:
        yield service.create_rest_client()


@pytest.mark.parametrize("path", ["tunemesh://runs/r1/sampler/final", "tinker://r1/weights/step-2"])
def test_the_run_of_a_checkpoint_reads_like_tinkers_training_run(rest, channel, path):
    run = rest.get_training_run_by_tinker_path(path).result(timeout=5)
    assert (run.training_run_id, run.base_model, run.lora_rank, run.is_lora) == ("runs/r1", "tiny-dense", 8, True)
    assert run.user_metadata["renderer_name"] == "qwen3"
    assert [r.name for r in channel.requests("GetTrainingRun")] == ["runs/r1"]
    assert asyncio.run(_awaited(rest.get_training_run("r1"))).training_run_id == "runs/r1"


async def _awaited(future):
    return await future


def test_a_missing_run_fails_the_future_with_not_found(rest):
    with pytest.raises(tunemesh.NotFoundError) as raised:
        rest.get_training_run("runs/gone").result(timeout=5)
    assert isinstance(raised.value, tunemesh.TinkerError) and raised.value.reason == "RUN_NOT_FOUND"


def test_bad_paths_raise_value_error_at_the_call(rest, channel):
    with pytest.raises(ValueError, match="imported checkpoint"):
        rest.get_training_run_by_tinker_path("tunemesh://imports/mine")
    with pytest.raises(ValueError, match="Invalid tinker path"):
        rest.delete_checkpoint_from_tinker_path("s3://bucket/x")
    with pytest.raises(ValueError, match="external_weights"):
        rest.delete_checkpoint_from_tinker_path("tinker://r1/external_weights/x")
    assert channel.calls == []


def test_list_training_runs_follows_pages_and_slices(rest, channel):
    listed = rest.list_training_runs(limit=2, offset=1).result(timeout=5)
    assert [r.training_run_id for r in listed.training_runs] == ["runs/r1", "runs/r2"]
    assert (listed.cursor.offset, listed.cursor.limit, listed.cursor.total_count) == (1, 2, 5)
    assert [r.page_token for r in channel.requests("ListTrainingRuns")] == ["", "2", "4"]


def test_list_checkpoints_of_a_run_and_of_the_user(rest, channel):
    of_run = rest.list_checkpoints("r1").result(timeout=5)
    assert [c.checkpoint_id for c in of_run.checkpoints] == ["weights/old", "sampler_weights/new"]
    assert [c.checkpoint_type for c in of_run.checkpoints] == ["training", "sampler"]
    assert of_run.checkpoints[0].tinker_path == "tunemesh://runs/r1/state/old"
    assert of_run.checkpoints[0].time == datetime.datetime.fromtimestamp(100, datetime.timezone.utc)
    assert {r.run for r in channel.requests("ListCheckpoints")} == {"runs/r1"}
    mine = rest.list_user_checkpoints(limit=3).result(timeout=5)
    assert [c.name for c in mine.checkpoints] == ["new", "mid", "old"]  # newest first
    assert mine.cursor.total_count == 4


def test_delete_and_ttl_send_tunemesh_paths(rest, channel):
    assert rest.delete_checkpoint_from_tinker_path("tinker://r1/sampler_weights/x").result(timeout=5) is None
    rest.delete_checkpoint("runs/r1", "weights/s").result(timeout=5)
    rest.delete_checkpoint_from_tinker_path("tunemesh://imports/mine").result(timeout=5)
    assert [r.path for r in channel.requests("DeleteCheckpoint")] == [
        "tunemesh://runs/r1/sampler/x", "tunemesh://runs/r1/state/s", "tunemesh://imports/mine"]
    rest.set_checkpoint_ttl_from_tinker_path("tinker://r1/weights/s", 3600).result(timeout=5)
    rest.set_checkpoint_ttl_from_tinker_path("tinker://r1/weights/s", None).result(timeout=5)
    assert [r.ttl_seconds for r in channel.requests("UpdateCheckpointTtl")] == [3600, 0]
    with pytest.raises(ValueError, match="ttl_seconds"):
        rest.set_checkpoint_ttl_from_tinker_path("tinker://r1/weights/s", 0)


def test_weights_info_and_capabilities(rest):
    info = rest.get_weights_info_by_tinker_path("tinker://r1/weights/old").result(timeout=5)
    assert (info.base_model, info.lora_rank, info.train_attn, info.train_unembed) == ("tiny-dense", 8, True, False)
    capabilities = rest.get_server_capabilities().result(timeout=5)
    assert [m.model_name for m in capabilities.supported_models] == ["tiny-dense"]


def test_calls_tunemesh_lacks_raise_not_implemented(rest):
    with pytest.raises(NotImplementedError, match="get_external_weights_urls.*no external weights"):
        rest.get_external_weights_urls("tinker://r1/external_weights/x")
    with pytest.raises(NotImplementedError, match="audit log"):
        tunemesh.AdminClient().get_audit_log(day=datetime.date(2026, 1, 1))
    with pytest.raises(NotImplementedError, match="billing"):
        tunemesh.AdminClient(base_url="x").get_billing_usage()
    with pytest.raises(AttributeError):
        _ = rest.no_such_call


def test_a_rest_client_of_its_own_connects_like_a_service_client(channel):
    rest = tunemesh.RestClient(base_url="127.0.0.1:9", api_key="k", tls=False)
    rest.close()
    with tunemesh.ServiceClient("fake:1", "k", channel=channel) as service:
        with pytest.raises(ValueError, match="own connection"):
            tunemesh.RestClient(service._transport, base_url="x")


def test_tinkers_module_paths_hold_the_same_classes():
    from tunemesh.lib.public_interfaces import APIFuture, ServiceClient
    from tunemesh.lib.public_interfaces.rest_client import RestClient
    from tunemesh.types.tensor_data import TensorData

    assert (RestClient, APIFuture, ServiceClient, TensorData) == (
        tunemesh.RestClient, tunemesh.APIFuture, tunemesh.ServiceClient, tunemesh.TensorData)
