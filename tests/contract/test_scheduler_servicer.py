"""Public scheduler servicers on an in-process server, wired to a real trainer.

SchedulerCore + GrpcTrainerPort talk to an in-process TrainerServicer over the tiny-dense
torch engine; EtcdPlacement runs over an in-memory placement table. Clients are the raw
public stubs and the SDK. The trainer servicer counts the RPCs that reach it, so tests
can show that rejected requests never got there.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

import tunemesh
from tunemesh.v1 import operations_pb2, sessions_pb2, training_pb2, types_pb2
from tunemesh import tensors
from tunemesh.errors import error_from_rpc
from tunemesh_common.models import TINY_DENSE

from mesh_harness import A, ADAM, B, FAST_RETRY, LIMITS, LORA, VOCAB, datum, reference_logprobs, status_of


# ---- raw stubs ---------------------------------------------------------------------------


def test_forward_backward_optim_step_and_wait(mesh):
    run = mesh.new_run()
    tokens, targets = [5, 6, 7, 8, 9], [6, 7, 8, 9, 10]
    fb_request = training_pb2.ForwardBackwardRequest(run=run, seq_id=1, request_id="fb-1",
                                                     data=[datum(tokens, targets, [1, 1, 1, 1, 1])])
    fb = mesh.training.ForwardBackward(fb_request, metadata=A).operation
    step = mesh.training.OptimStep(
        training_pb2.OptimStepRequest(run=run, seq_id=2, request_id="os-2", adam_params=ADAM), metadata=A).operation
    assert (fb.run, fb.seq_id, step.seq_id) == (run, 1, 2)
    fb_done, step_done = mesh.wait(fb.name), mesh.wait(step.name)
    assert fb_done.state == operations_pb2.OPERATION_STATE_SUCCEEDED
    (output,) = fb_done.forward_backward.outputs
    logprobs = tensors.decode(output.loss_fn_outputs["logprobs"])
    np.testing.assert_allclose(logprobs, reference_logprobs(mesh.model_dir, tokens, targets), atol=1e-4)
    assert fb_done.forward_backward.metrics["loss:sum"] == pytest.approx(-logprobs.sum(), rel=1e-5)
    assert step_done.state == operations_pb2.OPERATION_STATE_SUCCEEDED
    assert step_done.optim_step.metrics["step:max"] == 1.0 and step_done.optim_step.metrics["grad_norm:max"] > 0
    got = mesh.training.GetTrainingRun(training_pb2.GetTrainingRunRequest(name=run), metadata=A).run
    assert (got.step, got.last_seq_id, got.trainer_node, got.base_model) == (1, 2, "node-t", TINY_DENSE)
    assert (got.lora_config.rank, got.lora_config.alpha) == (4, 4.0)  # alpha 0 -> rank
    fetched = mesh.operations.GetOperation(operations_pb2.GetOperationRequest(name=fb.name), metadata=A).operation
    assert fetched == fb_done
    # A retry with the same request id is the same operation and does not run again.
    before = mesh.trainer.calls["RunBatch"]
    retry = mesh.training.ForwardBackward(fb_request, metadata=A).operation
    assert retry.name == fb.name and mesh.trainer.calls["RunBatch"] == before
    names = [r.name for r in mesh.training.ListTrainingRuns(training_pb2.ListTrainingRunsRequest(), metadata=A).runs]
    assert run in names


def test_auth_is_required_and_checked(mesh):
    calls = {
        "capabilities": lambda md: mesh.sessions.GetCapabilities(sessions_pb2.GetCapabilitiesRequest(), metadata=md),
        "session": lambda md: mesh.sessions.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=md),
        "run": lambda md: mesh.training.GetTrainingRun(training_pb2.GetTrainingRunRequest(name="runs/x"), metadata=md),
    }
    before = dict(mesh.trainer.calls)
    for call in calls.values():
        assert status_of(lambda: call(())) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_API_KEY")
        bad = (("authorization", "Bearer key-zzz"),)
        assert status_of(lambda: call(bad)) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY")
    assert dict(mesh.trainer.calls) == before


def test_tenants_cannot_see_each_other(mesh):
    run = mesh.new_run(A)
    fb = mesh.training.ForwardBackward(
        training_pb2.ForwardBackwardRequest(run=run, seq_id=1, data=[datum([1, 2, 3])]), metadata=A).operation
    mesh.wait(fb.name)
    not_found = grpc.StatusCode.NOT_FOUND
    assert status_of(lambda: mesh.training.GetTrainingRun(
        training_pb2.GetTrainingRunRequest(name=run), metadata=B)) == (not_found, "RUN_NOT_FOUND")
    assert status_of(lambda: mesh.training.ForwardBackward(
        training_pb2.ForwardBackwardRequest(run=run, seq_id=2, data=[datum([1, 2])]), metadata=B))[0] == not_found
    assert status_of(lambda: mesh.training.OptimStep(
        training_pb2.OptimStepRequest(run=run, seq_id=2, adam_params=ADAM), metadata=B))[0] == not_found
    for method, request in [
        (mesh.operations.GetOperation, operations_pb2.GetOperationRequest(name=fb.name)),
        (mesh.operations.WaitOperation, operations_pb2.WaitOperationRequest(name=fb.name)),
        (mesh.operations.CancelOperation, operations_pb2.CancelOperationRequest(name=fb.name)),
    ]:
        assert status_of(lambda: method(request, metadata=B))[0] == not_found
    session_a = mesh.sessions.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=A).session.name
    assert status_of(lambda: mesh.training.CreateTrainingRun(training_pb2.CreateTrainingRunRequest(
        session=session_a, base_model=TINY_DENSE, lora_config=LORA), metadata=B))[0] == not_found
    listed = mesh.training.ListTrainingRuns(training_pb2.ListTrainingRunsRequest(), metadata=B).runs
    assert run not in [r.name for r in listed]


def _fb(**kw):
    return lambda run: training_pb2.ForwardBackwardRequest(run=run, seq_id=1, **kw)


def _bad_bytes() -> types_pb2.Datum:
    d = datum([1, 2, 3], weights=[1, 1, 1])
    d.loss_fn_inputs["weights"].data = b"\x00" * 5
    return d


def _with_extra_input() -> types_pb2.Datum:
    d = datum([1, 2, 3])
    d.loss_fn_inputs["advantages"].CopyFrom(tensors.encode(np.float32([1, 1, 1])))
    return d


def _without_targets() -> types_pb2.Datum:
    d = datum([1, 2, 3])
    del d.loss_fn_inputs["target_tokens"]
    return d


BAD_SUBMITS = {
    "EMPTY_DATA": _fb(data=[]),
    "REQUEST_TOO_LARGE:datums": _fb(data=[datum([1, 2])] * (LIMITS.max_datums + 1)),
    "REQUEST_TOO_LARGE:tokens": _fb(data=[datum([1] * 40), datum([1] * 40)]),
    "SEQUENCE_TOO_LONG": _fb(data=[datum([1] * 513)]),
    "TOKEN_OUT_OF_RANGE:vocab": _fb(data=[datum([1, VOCAB, 2])]),
    "TOKEN_OUT_OF_RANGE:negative": _fb(data=[datum([1, -3, 2])]),
    "TOKEN_OUT_OF_RANGE:target": _fb(data=[datum([1, 2, 3], targets=[2, 3, VOCAB + 7])]),
    "SHAPE_MISMATCH:targets": _fb(data=[datum([1, 2, 3], targets=[2, 3])]),
    "SHAPE_MISMATCH:weights": _fb(data=[datum([1, 2, 3], weights=[1, 1])]),
    "BAD_DTYPE": lambda run: _float_targets(run),
    "NON_FINITE_INPUT": _fb(data=[datum([1, 2, 3], weights=[1, np.nan, 1])]),
    "BAD_TENSOR": _fb(data=[_bad_bytes()]),
    "UNKNOWN_LOSS": _fb(data=[datum([1, 2])], loss_fn="ppo_v9"),
    "UNKNOWN_LOSS_CONFIG": _fb(data=[datum([1, 2])], loss_fn_config={"clip": types_pb2.LossConfigValue(number=1)}),
    "UNKNOWN_LOSS_INPUT": _fb(data=[_with_extra_input()]),
    "MISSING_LOSS_INPUT": _fb(data=[_without_targets()]),
    "INVALID_SEQ_ID": lambda run: training_pb2.ForwardBackwardRequest(run=run, seq_id=0, data=[datum([1, 2])]),
}
def _float_targets(run):
    d = datum([1, 2, 3])
    d.loss_fn_inputs["target_tokens"].CopyFrom(tensors.encode(np.float32([2, 3, 4])))
    return training_pb2.ForwardBackwardRequest(run=run, seq_id=1, data=[d])


@pytest.fixture(scope="module")
def validation_run(mesh):
    return mesh.new_run()


@pytest.mark.parametrize("case", sorted(BAD_SUBMITS))
def test_invalid_submit_never_reaches_the_trainer(mesh, validation_run, case):
    request = BAD_SUBMITS[case](validation_run)
    before = dict(mesh.trainer.calls)
    for method in (mesh.training.ForwardBackward, mesh.training.Forward):
        wire = request if method is mesh.training.ForwardBackward else training_pb2.ForwardRequest.FromString(
            request.SerializeToString())
        assert status_of(lambda: method(wire, metadata=A)) == (grpc.StatusCode.INVALID_ARGUMENT, case.split(":")[0])
    assert dict(mesh.trainer.calls) == before


@pytest.mark.parametrize("params, field", [
    (dict(learning_rate=-1.0), "learning_rate"), (dict(beta1=1.0), "beta1"), (dict(eps=float("nan")), "eps"),
])
def test_invalid_optim_step_never_reaches_the_trainer(mesh, validation_run, params, field):
    before = dict(mesh.trainer.calls)
    request = training_pb2.OptimStepRequest(run=validation_run, seq_id=1, adam_params=types_pb2.AdamParams(**params))
    with pytest.raises(grpc.RpcError) as info:
        mesh.training.OptimStep(request, metadata=A)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_from_rpc(info.value).reason == "BAD_OPTIMIZER_PARAM"
    assert field in info.value.details()
    assert dict(mesh.trainer.calls) == before


def test_rejected_submits_leave_no_seq_id_gap(mesh, validation_run):
    # Runs after the rejection cases above (file order): seq_id 1 is still free.
    for case in ("EMPTY_DATA", "TOKEN_OUT_OF_RANGE:vocab"):
        status_of(lambda: mesh.training.ForwardBackward(BAD_SUBMITS[case](validation_run), metadata=A))
    op = mesh.training.ForwardBackward(training_pb2.ForwardBackwardRequest(
        run=validation_run, seq_id=1, data=[datum([3, 4, 5])]), metadata=A).operation
    assert mesh.wait(op.name).state == operations_pb2.OPERATION_STATE_SUCCEEDED


@pytest.mark.parametrize("lora, code, reason", [
    (types_pb2.LoraConfig(rank=129, train_attn=True), grpc.StatusCode.INVALID_ARGUMENT, "BAD_LORA_RANK"),
    (types_pb2.LoraConfig(rank=-2, train_attn=True), grpc.StatusCode.INVALID_ARGUMENT, "BAD_LORA_RANK"),
    (types_pb2.LoraConfig(rank=8), grpc.StatusCode.INVALID_ARGUMENT, "NO_LORA_TARGETS"),
    (types_pb2.LoraConfig(rank=8, alpha=-1, train_mlp=True), grpc.StatusCode.INVALID_ARGUMENT, "BAD_LORA_ALPHA"),
])
def test_invalid_run_creation_never_reaches_the_trainer(mesh, lora, code, reason):
    session = mesh.sessions.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=A).session.name
    before = dict(mesh.trainer.calls)
    request = training_pb2.CreateTrainingRunRequest(session=session, base_model=TINY_DENSE, lora_config=lora)
    assert status_of(lambda: mesh.training.CreateTrainingRun(request, metadata=A)) == (code, reason)
    unknown = training_pb2.CreateTrainingRunRequest(session=session, base_model="no/such-model", lora_config=LORA)
    assert status_of(lambda: mesh.training.CreateTrainingRun(unknown, metadata=A)) == (
        grpc.StatusCode.NOT_FOUND, "UNKNOWN_MODEL")
    assert dict(mesh.trainer.calls) == before


def test_capabilities_come_from_the_trainer_node(mesh):
    caps = mesh.sessions.GetCapabilities(sessions_pb2.GetCapabilitiesRequest(), metadata=B)
    node = mesh.trainer.node()
    assert list(caps.models) == list(node.models)
    (model,) = caps.models
    assert (model.name, model.vocab_size, model.family) == (TINY_DENSE, VOCAB, "dense")
    assert (caps.limits.max_datums, caps.limits.max_tokens) == (LIMITS.max_datums, LIMITS.max_tokens)


def test_tokenizer_is_relayed_once_per_model(mesh):
    request = sessions_pb2.GetTokenizerRequest(base_model=TINY_DENSE)
    first = mesh.sessions.GetTokenizer(request, metadata=A).files
    fetched = mesh.trainer.calls["GetTokenizer"]
    second = mesh.sessions.GetTokenizer(request, metadata=B).files
    files = {f.name: f.content for f in first}
    assert files["tokenizer.json"] == (mesh.model_dir / "tokenizer.json").read_bytes()
    assert files["config.json"] == (mesh.model_dir / "config.json").read_bytes()  # the model's own, for HF caches
    assert list(second) == list(first)
    assert fetched == 1 and mesh.trainer.calls["GetTokenizer"] == 1
    unknown = sessions_pb2.GetTokenizerRequest(base_model="no/such-model")
    assert status_of(lambda: mesh.sessions.GetTokenizer(unknown, metadata=A)) == (
        grpc.StatusCode.NOT_FOUND, "UNKNOWN_MODEL")


# ---- SDK ---------------------------------------------------------------------------------


def sdk_datum(tokens: list[int]) -> tunemesh.Datum:
    return tunemesh.Datum(tunemesh.ModelInput.from_ints(tokens[:-1]),
                          {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def test_sdk_trains_through_the_scheduler(mesh, tmp_path):
    with tunemesh.ServiceClient(mesh.address, "key-a", retry_policy=FAST_RETRY,
                                tokenizer_cache_dir=tmp_path) as service:
        caps = service.get_server_capabilities()
        assert [m.model_name for m in caps.supported_models] == [TINY_DENSE]
        assert (caps.max_datums, caps.max_tokens) == (LIMITS.max_datums, LIMITS.max_tokens)
        trainer = service.create_lora_training_client(TINY_DENSE, rank=4, seed=5)
        probe = [sdk_datum([50, 51, 52, 53, 54])]
        before = trainer.forward(probe, "cross_entropy")
        fb = trainer.forward_backward(probe, "cross_entropy")  # pipelined: no wait in between
        step = trainer.optim_step(tunemesh.AdamParams(learning_rate=1e-2))
        after = trainer.forward(probe, "cross_entropy")
        lp_before = before.result(timeout=60).loss_fn_outputs[0]["logprobs"].to_numpy()
        fb_result, step_result = fb.result(timeout=60), step.result(timeout=60)
        lp_after = after.result(timeout=60).loss_fn_outputs[0]["logprobs"].to_numpy()
        assert lp_before.shape == (4,)
        np.testing.assert_allclose(
            lp_before, reference_logprobs(mesh.model_dir, [50, 51, 52, 53], [51, 52, 53, 54]), atol=1e-4)
        assert fb_result.metrics["loss:sum"] == pytest.approx(-lp_before.sum(), rel=1e-5)
        assert step_result.metrics["step:max"] == 1.0
        assert lp_after.sum() > lp_before.sum()
        tokenizer = service.get_tokenizer(TINY_DENSE)
        assert tokenizer is not None


def test_sdk_surfaces_validation_errors_as_typed_errors(mesh, tmp_path):
    with tunemesh.ServiceClient(mesh.address, "key-b", retry_policy=FAST_RETRY,
                                tokenizer_cache_dir=tmp_path) as service:
        trainer = service.create_lora_training_client(TINY_DENSE, rank=4)
        before = mesh.trainer.calls["RunBatch"]
        with pytest.raises(tunemesh.InvalidArgumentError) as info:
            trainer.forward_backward([sdk_datum([1, VOCAB + 1, 2])], "cross_entropy").result(timeout=30)
        assert info.value.reason == "TOKEN_OUT_OF_RANGE"
        assert mesh.trainer.calls["RunBatch"] == before
        ok = trainer.forward_backward([sdk_datum([1, 2, 3])], "cross_entropy").result(timeout=60)
        assert ok.metrics["loss:sum"] > 0
    with pytest.raises(tunemesh.UnauthenticatedError) as info:
        with tunemesh.ServiceClient(mesh.address, "key-zzz", retry_policy=FAST_RETRY) as bad:
            bad.get_server_capabilities()
    assert info.value.reason == "INVALID_API_KEY"


def test_sdk_delete_frees_the_adapter_on_the_trainer(mesh, tmp_path):
    with tunemesh.ServiceClient(mesh.address, "key-a", retry_policy=FAST_RETRY,
                                tokenizer_cache_dir=tmp_path) as service:
        trainer = service.create_lora_training_client(TINY_DENSE, rank=4, seed=6)
        trainer.forward_backward([sdk_datum([60, 61, 62])], "cross_entropy").result(timeout=60)
        deletes = mesh.trainer.calls["DeleteAdapter"]
        with pytest.raises(tunemesh.NotFoundError):  # only its owner may delete it
            with tunemesh.ServiceClient(mesh.address, "key-b", retry_policy=FAST_RETRY) as other:
                other._transport.call(other._transport.training.DeleteTrainingRun,
                                      training_pb2.DeleteTrainingRunRequest(name=trainer.run))
        assert mesh.trainer.calls["DeleteAdapter"] == deletes
        trainer.delete()
        assert mesh.trainer.calls["DeleteAdapter"] == deletes + 1
        with pytest.raises(tunemesh.NotFoundError):
            trainer.get_info()


def test_concurrent_creates_over_grpc_stop_at_the_run_quota(mesh):
    """12 concurrent CreateTrainingRun calls of one tenant under a quota of (held + 4)
    make exactly 4 runs; the others fail RESOURCE_EXHAUSTED [TENANT_RUN_QUOTA]."""
    from concurrent.futures import ThreadPoolExecutor

    session = mesh.sessions.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=B).session.name
    listed = mesh.training.ListTrainingRuns(training_pb2.ListTrainingRunsRequest(page_size=1000), metadata=B).runs
    registry = mesh.core.runs
    registry._max_runs_per_tenant = len(listed) + 4  # the module's mesh runs without a quota
    request = training_pb2.CreateTrainingRunRequest(session=session, base_model=TINY_DENSE, lora_config=LORA)

    def create(_):
        try:
            return mesh.training.CreateTrainingRun(request, metadata=B, timeout=60).run.name
        except grpc.RpcError as exc:
            return exc.code(), error_from_rpc(exc).reason

    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(create, range(12)))
    finally:
        registry._max_runs_per_tenant = 0
    made = [r for r in results if isinstance(r, str)]
    assert len(made) == 4
    refused = [r for r in results if not isinstance(r, str)]
    assert refused == [(grpc.StatusCode.RESOURCE_EXHAUSTED, "TENANT_RUN_QUOTA")] * 8
    for name in made:
        mesh.training.DeleteTrainingRun(training_pb2.DeleteTrainingRunRequest(name=name), metadata=B)
