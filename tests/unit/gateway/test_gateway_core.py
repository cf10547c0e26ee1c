"""Gateway core against a scripted scheduler (no servers): which tunemesh calls each
Tinker call makes, and what the Tinker client gets back."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from gateway_fakes import FakeUpstream
from tinker import types as tt
from tinker.proto import request_conv, response_conv
from tinker.proto import tinker_public_pb2 as tpb

from tunemesh import tensors
from tunemesh.errors import (
    FailedPreconditionError, InvalidArgumentError, NotFoundError, ResourceExhaustedError, UnavailableError,
)
from tunemesh.v1 import (
    checkpoints_pb2, operations_pb2, sampling_pb2, sessions_pb2, training_pb2, types_pb2,
)
from tunemesh_gateway.core import Caller, CoreConfig, GatewayCore
from tunemesh_gateway.core.futures import OP, FutureRef
from tunemesh_gateway.status import Gone, HttpError, Unsupported
from tunemesh_gateway.store import MemoryStore

ALICE, BOB = Caller("tml-alice"), Caller("tml-bob")
SESSION = "5d1c"
MODEL = f"{SESSION}:train:0"
RUN = "runs/r1"


def run(coro):
    return asyncio.run(coro)


async def gateway(upstream: FakeUpstream, **config) -> tuple[GatewayCore, MemoryStore]:
    store = MemoryStore()
    await store.put_model(MODEL, RUN)
    return GatewayCore(upstream, store, CoreConfig(poll_wait_s=0.05, **config)), store


def queued(name: str):
    def answer(request):
        return training_pb2.ForwardBackwardResponse(operation=operations_pb2.Operation(name=name))
    return answer


def fb_body(tokens: list[int], seq_id: int, loss_fn: str = "cross_entropy") -> tpb.ForwardBackwardRequest:
    datum = tt.Datum(model_input=tt.ModelInput.from_ints(tokens), loss_fn_inputs={"target_tokens": tokens})
    request = tt.ForwardBackwardRequest(forward_backward_input=tt.ForwardBackwardInput(data=[datum], loss_fn=loss_fn),
                                        model_id=MODEL, seq_id=seq_id)
    return request_conv.forward_backward_request_to_proto(request)


# -- sessions -----------------------------------------------------------------------

@pytest.mark.parametrize("error", [NotFoundError("SESSION_NOT_FOUND", "x"), FailedPreconditionError("SESSION_ENDED", "x")])
def test_a_heartbeat_for_a_gone_session_is_410(upstream, error):
    def refuse(request):
        raise error

    upstream.handlers["HeartbeatSession"] = refuse

    async def body():
        core, _ = await gateway(upstream)
        with pytest.raises(Gone):
            await core.sessions.heartbeat(ALICE, SESSION)
        assert upstream.requests("HeartbeatSession")[0].session == f"sessions/{SESSION}"
        assert upstream.keys == ["tml-alice"]  # the caller's key goes upstream
    run(body())


def test_client_config_keeps_chunks_within_the_scheduler_limits(upstream):
    upstream.handlers["GetCapabilities"] = lambda r: sessions_pb2.GetCapabilitiesResponse(
        limits=sessions_pb2.RequestLimits(max_datums=64, max_tokens=1000))

    async def body():
        core, _ = await gateway(upstream)
        config = tt.ClientConfigResponse.model_validate(await core.sessions.client_config(ALICE))
        assert config.fwdbwd_max_chunk_len == 64 and config.fwdbwd_max_chunk_bytes_count <= 16 * 1000
        assert not config.use_pyqwest_transport and not config.pjwt_auth_enabled and not config.proto_compress_fwdbwd
    run(body())


# -- ordered training calls ---------------------------------------------------------

def test_forward_backward_queues_with_the_sdk_seq_id_and_request_id(upstream):
    upstream.handlers["ForwardBackward"] = queued("operations/op1")

    async def body():
        core, _ = await gateway(upstream)
        answer = await core.training.forward_backward(ALICE, fb_body([1, 2], seq_id=4))
        sent = upstream.requests("ForwardBackward")[0]
        assert (sent.run, sent.seq_id, sent.request_id) == (RUN, 4, f"{MODEL}#4")
        assert answer["model_id"] == MODEL and answer["request_id"].startswith("tm1.")
    run(body())


def test_a_refused_ordered_call_leaves_no_gap_in_the_model_seq_ids(upstream):
    """The SDK never re-sends a call refused with 400 but has used its seq_id: a no-op
    forward at that seq_id lets the model's later calls run."""
    def refuse(request):
        raise InvalidArgumentError("TOKEN_OUT_OF_RANGE", "token 99999")

    upstream.handlers["ForwardBackward"] = refuse
    upstream.handlers["Forward"] = queued("operations/filler")

    async def body():
        core, _ = await gateway(upstream)
        with pytest.raises(InvalidArgumentError):
            await core.training.forward_backward(ALICE, fb_body([99999], seq_id=5))
        with pytest.raises(Unsupported):  # refused by the gateway itself: the same
            await core.training.forward_backward(ALICE, fb_body([1], seq_id=6, loss_fn="stable_reinforce"))
        with pytest.raises(Unsupported):
            await core.training.save_weights(ALICE, tt.SaveWeightsRequest(model_id=MODEL, path="x", seq_id=7,
                                                                          overwrite=True))
        fillers = upstream.requests("Forward")
        assert [(f.run, f.seq_id) for f in fillers] == [(RUN, 5), (RUN, 6), (RUN, 7)]
        filler = fillers[0]
        assert filler.request_id == f"{MODEL}#5#refused"
        assert tensors.decode(filler.data[0].loss_fn_inputs["weights"]).tolist() == [0.0]  # no gradient, no loss
    run(body())


def test_an_unknown_model_is_404_and_no_filler(upstream):
    def missing(request):
        raise NotFoundError("RUN_NOT_FOUND", "no run")

    upstream.handlers["OptimStep"] = missing

    async def body():
        core, _ = await gateway(upstream)
        with pytest.raises(NotFoundError):
            await core.training.optim_step(ALICE, tt.OptimStepRequest(model_id=MODEL, seq_id=2,
                                                                      adam_params=tt.AdamParams(learning_rate=0.1)))
        sent = upstream.requests("OptimStep")[0]
        assert sent.adam_params.learning_rate == pytest.approx(0.1) and sent.adam_params.eps == pytest.approx(1e-12)
        assert not upstream.requests("Forward")
    run(body())


def test_dimuon_is_unsupported(upstream):
    upstream.handlers["Forward"] = queued("operations/filler")

    async def body():
        core, _ = await gateway(upstream)
        with pytest.raises(Unsupported, match="dimuon"):
            await core.training.optim_step(ALICE, tt.OptimStepRequest(
                model_id=MODEL, seq_id=2, optimizer_params=tt.DimuonParams(learning_rate=0.1)))
    run(body())


# -- models -------------------------------------------------------------------------

def test_create_model_makes_one_run_named_by_the_model_id(upstream):
    def created(request):
        return training_pb2.CreateTrainingRunResponse(run=training_pb2.TrainingRun(name="runs/new"))

    def get_run(request):
        if upstream.keys[-1] != ALICE.api_key:
            raise NotFoundError("RUN_NOT_FOUND", "not yours")
        return training_pb2.GetTrainingRunResponse(run=training_pb2.TrainingRun(name=request.name))

    upstream.handlers["CreateTrainingRun"] = created
    upstream.handlers["GetTrainingRun"] = get_run

    async def body():
        core, store = await gateway(upstream)
        request = tt.CreateModelRequest(session_id=SESSION, model_seq_id=3, base_model="tunemesh/tiny-dense",
                                        lora_config=tt.LoraConfig(rank=8, seed=5), user_metadata={"renderer_name": "role_colon"})
        first = await core.training.create_model(ALICE, request)
        again = await core.training.create_model(ALICE, request)  # an HTTP retry
        assert first == again and first["model_id"] == f"{SESSION}:train:3"
        result = await core.futures.retrieve(ALICE, first["request_id"])
        assert tt.CreateModelResponse.model_validate(result).model_id == f"{SESSION}:train:3"
        [sent] = upstream.requests("CreateTrainingRun")
        assert (sent.session, sent.request_id, sent.lora_config.rank, sent.lora_config.seed) == (
            f"sessions/{SESSION}", f"{SESSION}:train:3", 8, 5)
        assert dict(sent.user_metadata) == {"renderer_name": "role_colon", "tinker.model_id": f"{SESSION}:train:3"}
        assert await store.run_of(f"{SESSION}:train:3") == "runs/new"
        with pytest.raises(Gone):  # another key does not see it
            await core.futures.retrieve(BOB, first["request_id"])
        restarted = GatewayCore(upstream, store, CoreConfig(poll_wait_s=0.05))  # its local futures are gone
        assert await restarted.futures.retrieve(ALICE, first["request_id"]) == {
            "type": "create_model", "model_id": f"{SESSION}:train:3"}
        with pytest.raises(Gone):
            await restarted.futures.retrieve(BOB, first["request_id"])
    run(body())


def test_another_key_reusing_a_create_request_id_runs_its_own_call_and_touches_nothing_of_the_first(upstream):
    """Background futures are keyed by (key, request id): a create that names someone else's
    model id (here: BOB sends ALICE's session id) neither finds ALICE's running work nor
    blocks it; BOB's own call runs and fails on its own (the session is not his)."""
    def created(request):
        if upstream.keys[-1] != ALICE.api_key:
            raise NotFoundError("SESSION_NOT_FOUND", "no such session of yours")
        return training_pb2.CreateTrainingRunResponse(run=training_pb2.TrainingRun(name="runs/new"))

    upstream.handlers["CreateTrainingRun"] = created

    async def body():
        core, store = await gateway(upstream)
        request = tt.CreateModelRequest(session_id=SESSION, model_seq_id=1, base_model="tunemesh/tiny-dense",
                                        lora_config=tt.LoraConfig(rank=8))
        alice = await core.training.create_model(ALICE, request)
        bob = await core.training.create_model(BOB, request)
        assert bob["request_id"] == alice["request_id"]  # the id names the model, not the key
        assert await core.futures.retrieve(BOB, bob["request_id"]) == {
            "error": "SESSION_NOT_FOUND: no such session of yours", "category": "user"}
        result = await core.futures.retrieve(ALICE, alice["request_id"])
        assert tt.CreateModelResponse.model_validate(result).model_id == f"{SESSION}:train:1"
        assert len(upstream.requests("CreateTrainingRun")) == 2 and await store.run_of(f"{SESSION}:train:1") == "runs/new"
    run(body())


def test_create_via_load_makes_a_run_from_the_checkpoint(upstream):
    upstream.handlers["CreateTrainingRun"] = lambda r: training_pb2.CreateTrainingRunResponse(
        run=training_pb2.TrainingRun(name="runs/r2"))

    async def body():
        core, _ = await gateway(upstream)
        path = f"tinker://{MODEL}/weights/step-1"
        answer = await core.training.load_weights(ALICE, tt.LoadWeightsRequest(
            session_id=SESSION, model_seq_id=1, path=path, optimizer=True))
        result = tt.LoadWeightsResponse.model_validate(await core.futures.retrieve(ALICE, answer["request_id"]))
        assert result.model_id == f"{SESSION}:train:1"
        [sent] = upstream.requests("CreateTrainingRun")
        assert (sent.from_checkpoint, sent.load_optimizer_state, sent.HasField("lora_config")) == (
            "tunemesh://runs/r1/state/step-1", True, False)
    run(body())


def test_a_model_id_the_table_lost_is_found_by_its_run_label(upstream):
    """A restarted in-memory gateway: the run carries its Tinker model id as a label."""
    session = f"sessions/{SESSION}"
    other = training_pb2.TrainingRun(name="runs/other", session=session,
                                     user_metadata={"tinker.model_id": f"{SESSION}:train:1"})
    mine = training_pb2.TrainingRun(name="runs/mine", session=session,
                                    user_metadata={"tinker.model_id": f"{SESSION}:train:2"})
    # a label naming another session's model id (anyone may write labels) is not believed
    forged = training_pb2.TrainingRun(name="runs/forged", session="sessions/mallory",
                                      user_metadata={"tinker.model_id": f"{SESSION}:train:7"})
    pages = {"": ([other, forged], "p2"), "p2": ([mine], "")}

    def listed(request):
        runs, token = pages[request.page_token]
        return training_pb2.ListTrainingRunsResponse(runs=runs, next_page_token=token)

    upstream.handlers["ListTrainingRuns"] = listed
    upstream.handlers["GetTrainingRun"] = lambda r: training_pb2.GetTrainingRunResponse(run=mine)

    async def body():
        core, store = await gateway(upstream)
        info = await core.training.get_info(ALICE, f"{SESSION}:train:2")
        assert upstream.requests("GetTrainingRun")[0].name == "runs/mine"
        assert tt.GetInfoResponse.model_validate(info).model_id == f"{SESSION}:train:2"
        assert await store.run_of(f"{SESSION}:train:1") == "runs/other"  # learned on the way
        run = tt.TrainingRun.model_validate(await core.catalog.training_run(ALICE, f"{SESSION}:train:2"))
        assert run.user_metadata is None  # the gateway's own label is not the user's
        with pytest.raises(NotFoundError):
            await core.training.get_info(ALICE, f"{SESSION}:train:9")
        with pytest.raises(NotFoundError):
            await core.training.get_info(ALICE, f"{SESSION}:train:7")
        assert await store.run_of(f"{SESSION}:train:7") is None
    run(body())


# -- futures ------------------------------------------------------------------------

def test_an_operation_is_polled_until_done_and_answers_in_tinker_types(upstream):
    polls = []

    def wait(request):
        polls.append(request.name)
        op = operations_pb2.Operation(name=request.name, done=len(polls) > 1)
        if op.done:
            op.forward_backward.CopyFrom(types_pb2.ForwardBackwardResult(
                outputs=[types_pb2.DatumOutput(loss_fn_outputs={"logprobs": tensors.encode(np.array([-1.0], np.float32))})],
                metrics={"loss:sum": 1.0}))
        return operations_pb2.WaitOperationResponse(operation=op)

    upstream.handlers["ForwardBackward"] = queued("operations/op1")
    upstream.handlers["WaitOperation"] = wait

    async def body():
        core, _ = await gateway(upstream)
        request_id = (await core.training.forward_backward(ALICE, fb_body([1], seq_id=1)))["request_id"]
        assert await core.futures.retrieve(ALICE, request_id) == {
            "type": "try_again", "request_id": request_id, "queue_state": "active"}
        out = await core.futures.retrieve(ALICE, request_id)
        read = response_conv.deserialize_forward_backward_output(out.SerializeToString())
        assert read.loss_fn_outputs[0]["logprobs"].tolist() == [-1.0] and polls == ["operations/op1"] * 2
    run(body())


def test_failed_and_forgotten_operations(upstream):
    def wait(request):
        if request.name == "operations/gone":
            raise NotFoundError("OPERATION_NOT_FOUND", "expired")
        op = operations_pb2.Operation(name=request.name, done=True)
        op.error.CopyFrom(operations_pb2.OperationError(code=3, reason="NON_FINITE_LOSS", message="loss is nan"))
        return operations_pb2.WaitOperationResponse(operation=op)

    upstream.handlers["WaitOperation"] = wait
    upstream.handlers["OptimStep"] = queued("operations/bad")

    async def body():
        core, _ = await gateway(upstream)
        bad = await core.training.optim_step(ALICE, tt.OptimStepRequest(model_id=MODEL, seq_id=1,
                                                                        adam_params=tt.AdamParams()))
        assert await core.futures.retrieve(ALICE, bad["request_id"]) == {
            "error": "NON_FINITE_LOSS: loss is nan", "category": "user"}
        unordered = FutureRef(OP, "operations/gone", model=MODEL).encode()  # no seq_id to fill: 410
        with pytest.raises(Gone):
            await core.futures.retrieve(ALICE, unordered)
        with pytest.raises(HttpError):
            await core.futures.retrieve(ALICE, "not-ours")
    run(body())


def saved(kind: int, path: str):
    def wait(request):
        op = operations_pb2.Operation(name=request.name, done=True)
        op.save_checkpoint.checkpoint.CopyFrom(checkpoints_pb2.Checkpoint(path=path, kind=kind))
        return operations_pb2.WaitOperationResponse(operation=op)
    return wait


def test_an_unnamed_sampler_save_opens_one_sampling_session(upstream):
    upstream.handlers["SaveWeightsForSampler"] = queued("operations/save")
    upstream.handlers["WaitOperation"] = saved(checkpoints_pb2.CHECKPOINT_KIND_SAMPLER, "tunemesh://runs/r1/sampler/auto-000003")
    upstream.handlers["CreateSamplingSession"] = lambda r: sampling_pb2.CreateSamplingSessionResponse(
        sampling_session=sampling_pb2.SamplingSession(name="sampling_sessions/ss1", base_model="m", model_path=r.model_path))

    async def body():
        core, _ = await gateway(upstream, unnamed_sampler_ttl_s=600)
        answer = await core.training.save_weights_for_sampler(ALICE, tt.SaveWeightsForSamplerRequest(
            model_id=MODEL, seq_id=3, sampling_session_seq_id=2))
        for _ in range(2):  # fetched twice (an HTTP retry): one sampling session
            result = await core.futures.retrieve(ALICE, answer["request_id"])
            assert tt.SaveWeightsForSamplerResponseInternal.model_validate(result).sampling_session_id == "ss1"
        [save] = upstream.requests("SaveWeightsForSampler")
        assert (save.name, save.ttl_seconds) == ("", 600)
        [made] = upstream.requests("CreateSamplingSession")
        assert (made.session, made.model_path) == (f"sessions/{SESSION}", "tunemesh://runs/r1/sampler/auto-000003")
        sampler = tt.GetSamplerResponse.model_validate(await core.sampling.get_sampler(ALICE, "ss1"))
        assert (sampler.base_model, sampler.model_path) == ("m", f"tinker://{MODEL}/sampler_weights/auto-000003")
        with pytest.raises(NotFoundError):
            await core.sampling.get_sampler(BOB, "ss1")
    run(body())


def test_named_saves_answer_tinker_paths(upstream):
    upstream.handlers["SaveState"] = queued("operations/s")
    upstream.handlers["WaitOperation"] = saved(checkpoints_pb2.CHECKPOINT_KIND_STATE, "tunemesh://runs/r1/state/ck")

    async def body():
        core, _ = await gateway(upstream)
        answer = await core.training.save_weights(ALICE, tt.SaveWeightsRequest(model_id=MODEL, path="ck", seq_id=2,
                                                                                ttl_seconds=7200))
        result = tt.SaveWeightsResponse.model_validate(await core.futures.retrieve(ALICE, answer["request_id"]))
        assert result.path == f"tinker://{MODEL}/weights/ck"
        assert upstream.requests("SaveState")[0].ttl_seconds == 7200
    run(body())


# -- samples ------------------------------------------------------------------------

def sampler_answers(upstream: FakeUpstream, prompt_logprobs: bool = True) -> None:
    def sample(request):
        response = sampling_pb2.SampleResponse(sequences=[
            sampling_pb2.SampledSequence(tokens=[7, 8], logprobs=[-0.5, -1.0], stop_reason=sampling_pb2.STOP_REASON_STOP)
            for _ in range(request.num_samples)])
        if prompt_logprobs and getattr(request, "prompt_logprobs", False):
            response.prompt_logprobs.extend([-1.0, -2.0])
        return response

    upstream.handlers["Sample"] = sample
    upstream.handlers["ComputeLogprobs"] = lambda r: sampling_pb2.ComputeLogprobsResponse(logprobs=[-3.0, -4.0])


def sample_request(**fields) -> tt.SampleRequest:
    params = fields.pop("sampling_params", tt.SamplingParams(max_tokens=4, seed=9, stop="\n"))
    fields = {"sampling_session_id": "ss1", "seq_id": 7, **fields}
    return tt.SampleRequest(prompt=tt.ModelInput.from_ints([1, 2, 3]), sampling_params=params, **fields)


def test_a_large_sample_is_split_and_gets_one_id_per_sequence(upstream):
    sampler_answers(upstream)

    async def body():
        core, _ = await gateway(upstream, max_samples_per_call=16)
        answer = await core.sampling.asample(ALICE, sample_request(num_samples=20, prompt_logprobs=True))
        assert len(set(answer["sample_sequence_ids"])) == 20
        out = await core.futures.retrieve(ALICE, answer["request_id"])
        read = response_conv.deserialize_sample_response(out.SerializeToString())
        assert len(read.sequences) == 20 and read.sequences[0].stop_reason == "stop"
        calls = upstream.requests("Sample")
        assert [c.num_samples for c in calls] == [16, 4]
        assert calls[0].sampling_session == "sampling_sessions/ss1" and calls[0].sampling_params.stop == ["\n"]
        assert calls[0].sampling_params.seed != calls[1].sampling_params.seed  # no repeated samples
        assert read.prompt_logprobs == [None, -1.0, -2.0]
        assert not upstream.requests("ComputeLogprobs")
    run(body())


def test_samples_without_a_seq_id_are_each_their_own(upstream):
    """The SDK numbers its samples; a raw HTTP call without seq_id must not find another's future."""
    sampler_answers(upstream)

    async def body():
        core, _ = await gateway(upstream)
        first = await core.sampling.asample(ALICE, sample_request(seq_id=None))
        second = await core.sampling.asample(ALICE, sample_request(seq_id=None))
        assert first["request_id"] != second["request_id"]
        assert not set(first["sample_sequence_ids"]) & set(second["sample_sequence_ids"])
        for answer in (first, second):
            await core.futures.retrieve(ALICE, answer["request_id"])
        assert len(upstream.requests("Sample")) == 2
    run(body())


def test_prompt_logprobs_come_from_compute_logprobs_when_sample_has_none(upstream):
    sampler_answers(upstream, prompt_logprobs=False)

    async def body():
        core, _ = await gateway(upstream)
        answer = await core.sampling.asample(ALICE, sample_request(prompt_logprobs=True, prompt_logprobs_last_n=1))
        read = response_conv.deserialize_sample_response(
            (await core.futures.retrieve(ALICE, answer["request_id"])).SerializeToString())
        assert read.prompt_logprobs == [None, None, -4.0]
    run(body())


def test_no_max_tokens_means_up_to_the_context_limit(upstream):
    sampler_answers(upstream)

    async def body():
        core, _ = await gateway(upstream)
        answer = await core.sampling.asample(ALICE, sample_request(sampling_params=tt.SamplingParams()))
        await core.futures.retrieve(ALICE, answer["request_id"])
        params = upstream.requests("Sample")[0].sampling_params
        assert params.max_tokens == 0 and params.top_k == 0 and not params.HasField("seed")
    run(body())


def test_a_sample_the_mesh_could_not_take_is_410_and_runs_again_when_resubmitted(upstream):
    sampler_answers(upstream)
    good = upstream.handlers["Sample"]
    failures = [ResourceExhaustedError("SAMPLER_BUSY", "full"), UnavailableError("NO_SAMPLER", "down")]

    def flaky(request):
        if failures:
            raise failures.pop(0)
        return good(request)

    upstream.handlers["Sample"] = flaky

    async def body():
        core, _ = await gateway(upstream)
        for _ in range(2):
            answer = await core.sampling.asample(ALICE, sample_request())
            with pytest.raises(Gone):
                await core.futures.retrieve(ALICE, answer["request_id"])
        answer = await core.sampling.asample(ALICE, sample_request())
        out = await core.futures.retrieve(ALICE, answer["request_id"])
        assert len(out.sequences) == 1
    run(body())


def test_a_sample_refused_for_bad_input_fails_its_future(upstream):
    def refuse(request):
        raise InvalidArgumentError("TOKEN_OUT_OF_RANGE", "prompt token 5000")

    upstream.handlers["Sample"] = refuse

    async def body():
        core, _ = await gateway(upstream)
        answer = await core.sampling.asample(ALICE, sample_request())
        failed = await core.futures.retrieve(ALICE, answer["request_id"])
        assert failed == {"error": "TOKEN_OUT_OF_RANGE: prompt token 5000", "category": "user"}
    run(body())


def test_too_many_samples_in_flight_is_429(upstream):
    gate = asyncio.Event()

    async def slow(request):
        await gate.wait()
        return sampling_pb2.SampleResponse()

    upstream.handlers["Sample"] = slow

    async def body():
        core, _ = await gateway(upstream, max_inflight_samples=1)
        first = await core.sampling.asample(ALICE, sample_request())
        assert await core.sampling.asample(ALICE, sample_request()) == first  # the same request again is fine
        with pytest.raises(HttpError) as refused:
            await core.sampling.asample(ALICE, sample_request(seq_id=8))
        assert refused.value.status == 429
        gate.set()
        await core.close()
    run(body())


def test_sampling_sessions_are_made_once_per_client_counter(upstream):
    upstream.handlers["CreateSamplingSession"] = lambda r: sampling_pb2.CreateSamplingSessionResponse(
        sampling_session=sampling_pb2.SamplingSession(name=f"sampling_sessions/ss{len(upstream.calls)}",
                                                      base_model=r.base_model or "m"))

    async def body():
        core, _ = await gateway(upstream)
        request = tt.CreateSamplingSessionRequest(session_id=SESSION, sampling_session_seq_id=0, base_model="m")
        first, again = await asyncio.gather(core.sampling.create_sampling_session(ALICE, request),
                                            core.sampling.create_sampling_session(ALICE, request))
        assert first == again and len(upstream.requests("CreateSamplingSession")) == 1
        from_path = tt.CreateSamplingSessionRequest(session_id=SESSION, sampling_session_seq_id=1,
                                                    model_path=f"tinker://{MODEL}/sampler_weights/s")
        await core.sampling.create_sampling_session(ALICE, from_path)
        sent = upstream.requests("CreateSamplingSession")[1]
        assert (sent.base_model, sent.model_path) == ("", "tunemesh://runs/r1/sampler/s")
    run(body())


def test_nan_free_logprobs_survive(upstream):
    """Sampled-token logprobs are never dropped (RL reads them)."""
    sampler_answers(upstream)

    async def body():
        core, _ = await gateway(upstream)
        answer = await core.sampling.asample(ALICE, sample_request())
        read = response_conv.deserialize_sample_response(
            (await core.futures.retrieve(ALICE, answer["request_id"])).SerializeToString())
        assert read.sequences[0].logprobs == [-0.5, -1.0] and not any(map(math.isnan, read.sequences[0].logprobs))
        assert read.prompt_logprobs is None
    run(body())


def test_a_training_call_the_scheduler_lost_fails_and_a_no_op_takes_its_seq_id(upstream):
    def lost(request):
        raise NotFoundError("OPERATION_NOT_FOUND", "no such operation")

    upstream.handlers["OptimStep"] = queued("operations/o5")
    upstream.handlers["WaitOperation"] = lost
    upstream.handlers["Forward"] = queued("operations/filler")

    async def body():
        core, _ = await gateway(upstream)
        submitted = await core.training.optim_step(ALICE, tt.OptimStepRequest(
            model_id=MODEL, seq_id=5, adam_params=tt.AdamParams(learning_rate=0.1)))
        answer = await core.futures.retrieve(ALICE, submitted["request_id"])
        assert answer["error"].startswith("OPERATION_LOST") and answer["category"] == "server"
        (filler,) = upstream.requests("Forward")
        assert filler.seq_id == 5 and filler.request_id.endswith("#refused")
    run(body())


def test_an_open_arriving_after_a_failed_create_waits_for_the_one_in_progress(upstream):
    first_fails, made = asyncio.Event(), []

    async def create(request):
        made.append(request)
        if len(made) == 1:
            await first_fails.wait()
            raise UnavailableError("NO_SAMPLER", "none yet")
        for _ in range(5):  # the retry is still creating when the late caller arrives
            await asyncio.sleep(0)
        return sampling_pb2.CreateSamplingSessionResponse(sampling_session=sampling_pb2.SamplingSession(
            name=f"sampling_sessions/s{len(made)}", base_model="m"))

    upstream.handlers["CreateSamplingSession"] = create

    async def body():
        core, _ = await gateway(upstream)
        opening = lambda: asyncio.ensure_future(core.sampling.open(ALICE, SESSION, 3, "m", "", ""))  # noqa: E731
        failing, waiting = opening(), opening()
        for _ in range(3):
            await asyncio.sleep(0)
        first_fails.set()
        with pytest.raises(UnavailableError):
            await failing
        late = opening()  # arrives while `waiting` creates
        entries = await asyncio.gather(waiting, late)
        assert len(made) == 2 and entries[0].sampler_id == entries[1].sampler_id
        assert core.sampling._opening == {}
    run(body())
