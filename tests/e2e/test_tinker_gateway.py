"""The official `tinker` SDK, unmodified, against a real mesh through the gateway: etcd,
checkpoint service, trainer, torch sampler and scheduler as processes (the session's
`gateway_mesh`), the gateway as a process on a loopback port in front of them (TLS to the
scheduler, with the mesh CA; `gateway_process`)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from gateway_process import MODEL, Gateway

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

pytestmark = pytest.mark.e2e

PROMPT = [5, 6, 7, 8]
ANSWER = [60, 61, 62, 63, 64, 65]
TIMEOUT = 120


@pytest.fixture
def gateway_url(gateway: Gateway) -> str:
    return gateway.url


@pytest.fixture
def service(gateway_url: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    client = tinker.ServiceClient(base_url=gateway_url, api_key="tml-demo-alice")
    yield client
    client.close("success").result(timeout=TIMEOUT)


def datum(tokens: list[int], **inputs) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def taught() -> types.Datum:
    tokens = PROMPT + ANSWER
    return datum(tokens, target_tokens=tokens[1:], weights=[0.0] * (len(PROMPT) - 1) + [1.0] * len(ANSWER))


def tokenizer(model_data_dir: pathlib.Path):
    """The tiny model's tokenizer, from the session's model cache (only to spell a stop string)."""
    from tokenizers import Tokenizer

    from tunemesh_common.models import TINY_DENSE, ModelRegistry

    return Tokenizer.from_file(str(ModelRegistry.default(model_data_dir).materialize(TINY_DENSE) / "tokenizer.json"))


def logprobs_of(result) -> list[np.ndarray]:
    return [np.asarray(out["logprobs"].to_numpy()) for out in result.loss_fn_outputs]


def test_tinker_sdk_trains_samples_saves_and_loads_through_the_gateway(service, gateway_url, model_data_dir):
    trainer = service.create_lora_training_client(base_model=MODEL, rank=8, seed=3,
                                                  user_metadata={"renderer_name": "role_colon"}).result(timeout=TIMEOUT)
    assert trainer.model_id.endswith(":train:0")
    assert trainer.get_info().model_data.model_name == MODEL

    # cross_entropy, pipelined: forward_backward and optim_step submitted before either is awaited;
    # taught until every answer token is likelier than 0.9
    first = None
    for _ in range(10):
        for _ in range(20):
            result = trainer.forward_backward([taught()], "cross_entropy")
            done = trainer.optim_step(types.AdamParams(learning_rate=1e-2))
            first = first or result.result(timeout=TIMEOUT)
        last = result.result(timeout=TIMEOUT)
        if logprobs_of(last)[0][len(PROMPT) - 1:].min() > np.log(0.9):
            break
    assert "step:max" in done.result(timeout=TIMEOUT).metrics
    assert last.metrics["loss:sum"] < first.metrics["loss:sum"] / 4
    assert logprobs_of(last)[0][len(PROMPT) - 1:].min() > np.log(0.9)

    # sampling from an unnamed save: greedy continues as taught; a stop token ends it and is kept
    sampler = trainer.save_weights_and_get_sampling_client().result(timeout=TIMEOUT)
    prompt = types.ModelInput.from_ints(PROMPT)
    greedy = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=len(ANSWER), temperature=0.0)).result(timeout=TIMEOUT)
    assert greedy.sequences[0].tokens == ANSWER and greedy.sequences[0].stop_reason == "length"
    stopped = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=len(ANSWER), temperature=0.0,
                                                             stop=[ANSWER[2]])).result(timeout=TIMEOUT)
    assert stopped.sequences[0].tokens == ANSWER[:3] and stopped.sequences[0].stop_reason == "stop"
    stop_text = tokenizer(model_data_dir).decode(ANSWER[2:4])  # two tokens' text: kept in the output, as Tinker does
    by_text = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=len(ANSWER), temperature=0.0,
                                                             stop=[stop_text])).result(timeout=TIMEOUT)
    assert by_text.sequences[0].tokens == ANSWER[:4] and by_text.sequences[0].stop_reason == "stop"

    # importance_sampling on sampled sequences; the trainer scores them as the sampler did
    drawn = sampler.sample(prompt, 3, types.SamplingParams(max_tokens=5, temperature=1.0, seed=7)).result(timeout=TIMEOUT)
    assert len({seq.sequence_id for seq in drawn.sequences}) == 3
    rl = []
    for seq in drawn.sequences:
        tokens, n = PROMPT + seq.tokens, len(PROMPT) - 1
        rl.append(datum(tokens, target_tokens=tokens[1:], logprobs=[0.0] * n + seq.logprobs,
                        advantages=[0.0] * n + [1.0] * len(seq.tokens)))
    scored = trainer.forward_backward(rl, "importance_sampling").result(timeout=TIMEOUT)
    assert np.isfinite(scored.metrics["loss:sum"])
    for seq, learner in zip(drawn.sequences, logprobs_of(scored)):
        np.testing.assert_allclose(learner[len(PROMPT) - 1:], seq.logprobs, atol=1e-3)
    prompt_logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(PROMPT + ANSWER)).result(timeout=TIMEOUT)
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(PROMPT + ANSWER)
    trainer.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=TIMEOUT)

    # save_state / load_state, and a new training client from the state, optimizer included
    state = trainer.save_state("state-1").result(timeout=TIMEOUT)
    assert state.path == f"tinker://{trainer.model_id}/weights/state-1"
    here = logprobs_of(trainer.forward([taught()], "cross_entropy").result(timeout=TIMEOUT))[0]
    with pytest.warns(FutureWarning, match="load_state"):  # the legacy form, still sent by older code
        trainer.load_state(state.path).result(timeout=TIMEOUT)
    resumed = service.create_training_client_from_state_with_optimizer(state.path).result(timeout=TIMEOUT)
    assert resumed.model_id.endswith(":train:1")
    np.testing.assert_allclose(logprobs_of(resumed.forward([taught()], "cross_entropy").result(timeout=TIMEOUT))[0],
                               here, atol=1e-5)

    # a named sampler checkpoint, sampled by path (the SDK asks the gateway for its base model)
    named = trainer.save_weights_for_sampler("named-1").result(timeout=TIMEOUT)
    assert named.path == f"tinker://{trainer.model_id}/sampler_weights/named-1"
    by_path = service.create_sampling_client(model_path=named.path).result(timeout=TIMEOUT)
    again = by_path.sample(prompt, 1, types.SamplingParams(max_tokens=2, temperature=0.0)).result(timeout=TIMEOUT)
    assert again.sequences[0].tokens == ANSWER[:2]

    # the REST side: the run with its metadata, its checkpoints, TTL, delete
    rest = tinker.RestClient(base_url=gateway_url, api_key="tml-demo-alice")
    models = rest.get_server_capabilities().result(timeout=TIMEOUT).supported_models
    assert MODEL in {m.model_name: m.max_context_length for m in models if m.max_context_length}
    run = rest.get_training_run(trainer.model_id).result(timeout=TIMEOUT)
    assert (run.base_model, run.lora_rank, run.user_metadata) == (MODEL, 8, {"renderer_name": "role_colon"})
    assert rest.get_weights_info_by_tinker_path(state.path).result(timeout=TIMEOUT).lora_rank == 8
    rest.set_checkpoint_ttl_from_tinker_path(named.path, 7200).result(timeout=TIMEOUT)
    listed = {c.checkpoint_id: c for c in rest.list_checkpoints(trainer.model_id).result(timeout=TIMEOUT).checkpoints}
    assert {"weights/state-1", "sampler_weights/named-1"} <= set(listed)
    assert listed["sampler_weights/named-1"].expires_at is not None and listed["weights/state-1"].expires_at is None
    rest.delete_checkpoint_from_tinker_path(named.path).result(timeout=TIMEOUT)
    listed = {c.checkpoint_id for c in rest.list_checkpoints(trainer.model_id).result(timeout=TIMEOUT).checkpoints}
    assert "sampler_weights/named-1" not in listed and "weights/state-1" in listed
    assert trainer.model_id in {r.training_run_id for r in rest.list_training_runs().result(timeout=TIMEOUT).training_runs}


def test_a_bad_token_is_the_sdks_typed_error_and_the_client_goes_on(service, gateway_url):
    trainer = service.create_lora_training_client(base_model=MODEL, rank=4).result(timeout=TIMEOUT)
    bad = datum([5, 10**6, 7], target_tokens=[10**6, 7], weights=[1.0, 1.0])
    with pytest.raises(tinker.BadRequestError, match="TOKEN_OUT_OF_RANGE"):
        trainer.forward_backward([bad], "cross_entropy").result(timeout=TIMEOUT)
    # its seq_id is used up: the model's next calls must not wait on the gap
    later = trainer.forward_backward([taught()], "cross_entropy")
    assert np.isfinite(later.result(timeout=60).metrics["loss:sum"])
    trainer.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=60)

    bob = tinker.RestClient(base_url=gateway_url, api_key="tml-demo-bob")
    with pytest.raises(tinker.NotFoundError):  # another tenant's run does not exist for bob
        bob.get_training_run(trainer.model_id).result(timeout=TIMEOUT)
    with pytest.raises(tinker.AuthenticationError):
        tinker.RestClient(base_url=gateway_url, api_key="tml-not-a-key").list_training_runs().result(timeout=TIMEOUT)


def test_training_and_sampling_clients_go_on_across_a_gateway_restart(service, gateway):
    """The in-memory tables are gone after a restart: a model id is found again by its
    run's label, a training future by its operation, a sample is submitted again."""
    trainer = service.create_lora_training_client(base_model=MODEL, rank=4, seed=1).result(timeout=TIMEOUT)
    pending = trainer.forward_backward([taught()], "cross_entropy")
    sampler = trainer.save_weights_and_get_sampling_client().result(timeout=TIMEOUT)
    gateway.stop()
    gateway.start()  # same port
    assert np.isfinite(pending.result(timeout=TIMEOUT).metrics["loss:sum"])
    trainer.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=TIMEOUT)
    after = trainer.forward_backward([taught()], "cross_entropy").result(timeout=TIMEOUT)
    assert np.isfinite(after.metrics["loss:sum"])
    drawn = sampler.sample(types.ModelInput.from_ints(PROMPT), 2,
                           types.SamplingParams(max_tokens=3, temperature=1.0)).result(timeout=TIMEOUT)
    assert [len(seq.tokens) for seq in drawn.sequences] == [3, 3]
