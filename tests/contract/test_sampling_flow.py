"""Sampling through the public API: SDK -> scheduler -> sampler (torch engine) <- checkpoint
service, with the trainer writing the checkpoints; all real servicers in process."""

from __future__ import annotations

import concurrent.futures

import grpc
import numpy as np
import pytest
import torch

import tunemesh
from mesh_harness import FAST_RETRY, VOCAB, status_of
from tunemesh.v1 import sampling_pb2, sessions_pb2
from tunemesh_common.models import TINY_DENSE

PROMPT = [5, 6, 7, 8]
ANSWER = [40, 41, 42, 43, 44, 45]
GREEDY = tunemesh.SamplingParams(max_tokens=6, temperature=0.0)
PATIENT = tunemesh.RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, total_timeout_s=300.0, attempt_timeout_s=60.0)


@pytest.fixture()
def alice(mesh, tmp_path):
    with tunemesh.ServiceClient(mesh.address, "key-a", retry_policy=PATIENT, tokenizer_cache_dir=tmp_path) as s:
        yield s


@pytest.fixture(scope="module")
def trained(mesh, tmp_path_factory):
    """A run taught PROMPT -> ANSWER, its sampler checkpoint, and its PEFT download."""
    with tunemesh.ServiceClient(mesh.address, "key-a", retry_policy=PATIENT) as service:
        trainer = service.create_lora_training_client(TINY_DENSE, rank=8, seed=4)
        tokens = PROMPT + ANSWER
        datum = tunemesh.Datum(tunemesh.ModelInput.from_ints(tokens[:-1]), {
            "target_tokens": tokens[1:], "weights": [0.0] * (len(PROMPT) - 1) + [1.0] * len(ANSWER)})
        for _ in range(60):
            trainer.forward_backward([datum], "cross_entropy")
            trainer.optim_step(tunemesh.AdamParams(learning_rate=1e-2))
        path = trainer.save_weights_for_sampler("taught").result(timeout=120).path
        forward = trainer.forward([datum], "cross_entropy").result(timeout=60)
        directory = service.create_checkpoint_client().download(path, tmp_path_factory.mktemp("peft") / "a")
    return path, forward.loss_fn_outputs[0]["logprobs"].to_numpy(), tokens, directory


def _hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _base(mesh):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mesh.model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def _prompt(tokens: list[int]) -> tunemesh.ModelInput:
    return tunemesh.ModelInput.from_ints(tokens)


def test_greedy_with_the_trained_adapter_equals_peft_generate_and_differs_from_base(mesh, alice, trained):
    from peft import PeftModel

    path, _, _, directory = trained
    sampler = alice.create_sampling_client(model_path=path)
    base_client = alice.create_sampling_client(base_model=TINY_DENSE)
    tuned = sampler.sample(_prompt(PROMPT), 1, GREEDY)  # in flight together: one mixed batch
    plain = base_client.sample(_prompt(PROMPT), 1, GREEDY)
    tuned_tokens, plain_tokens = tuned.result(timeout=60).sequences[0].tokens, plain.result(timeout=60).sequences[0].tokens
    peft = PeftModel.from_pretrained(_base(mesh), directory).eval()
    assert tuned_tokens == _hf_greedy(peft, PROMPT, 6)
    assert tuned_tokens == ANSWER  # the answer the training taught
    assert plain_tokens == _hf_greedy(_base(mesh), PROMPT, 6) != ANSWER  # no adapter leaks into base rows


def test_compute_logprobs_matches_the_trainers_forward(alice, trained):
    path, trainer_logprobs, tokens, _ = trained
    logprobs = alice.create_sampling_client(model_path=path).compute_logprobs(_prompt(tokens)).result(timeout=60)
    assert logprobs[0] is None and len(logprobs) == len(tokens)
    np.testing.assert_allclose(np.array(logprobs[1:]), trainer_logprobs, atol=1e-4, rtol=0)


def test_sample_returns_the_prompt_logprobs_of_compute_logprobs_and_distinct_sequence_ids(alice, trained):
    path, _, tokens, _ = trained
    client = alice.create_sampling_client(model_path=path)
    params = tunemesh.SamplingParams(max_tokens=4, temperature=1.0, seed=3)
    response = client.sample(_prompt(tokens), 3, params, include_prompt_logprobs=True).result(timeout=60)
    assert response.prompt_logprobs == client.compute_logprobs(_prompt(tokens)).result(timeout=60)  # exactly
    ids = [s.sequence_id for s in response.sequences]
    again = [s.sequence_id for s in client.sample(_prompt(tokens), 3, params).result(timeout=60).sequences]
    assert all(ids) and len(set(ids + again)) == 6
    assert client.sample(_prompt(tokens), 1, params).result(timeout=60).prompt_logprobs is None


def test_max_tokens_unset_means_up_to_the_context_limit(mesh, alice):
    limit = alice.get_server_capabilities().supported_models[0].max_seq_len
    client = alice.create_sampling_client(base_model=TINY_DENSE)
    prompt = _prompt([5 + i % 50 for i in range(limit - 3)])
    unset = tunemesh.SamplingParams(temperature=0.0, stop=[])
    (sequence,) = client.sample(prompt, 1, unset).result(timeout=60).sequences
    assert len(sequence.tokens) <= 3 and (sequence.stop_reason == "stop" or len(sequence.tokens) == 3)
    full = _prompt([5] * limit)
    with pytest.raises(tunemesh.InvalidArgumentError, match="CONTEXT_EXCEEDED"):
        client.sample(full, 1, unset).result(timeout=60)


def test_runs_keep_the_callers_user_metadata(alice):
    notes = {"renderer_name": "role_colon", "recipe": "sl"}
    trainer = alice.create_lora_training_client(TINY_DENSE, rank=4, user_metadata=notes)
    assert trainer.get_info().user_metadata == notes
    assert alice.resume_training_client(trainer.get_info().model_id).get_info().user_metadata == notes
    with pytest.raises(tunemesh.InvalidArgumentError, match="BAD_USER_METADATA"):
        alice.create_lora_training_client(TINY_DENSE, rank=4, user_metadata={"k": "v" * 100_000})


def test_new_weights_are_seen_by_a_new_client_and_never_by_an_old_one(alice):
    trainer = alice.create_lora_training_client(TINY_DENSE, rank=4, seed=2)
    before = trainer.save_weights_and_get_sampling_client()
    first = before.sample(_prompt(PROMPT), 1, GREEDY).result(timeout=60).sequences[0].tokens
    tokens = PROMPT + [70, 71, 72, 73, 74, 75]
    datum = tunemesh.Datum(tunemesh.ModelInput.from_ints(tokens[:-1]), {
        "target_tokens": tokens[1:], "weights": [0.0] * 3 + [1.0] * 6})
    for _ in range(60):
        trainer.forward_backward([datum], "cross_entropy")
        trainer.optim_step(tunemesh.AdamParams(learning_rate=1e-2))
    after = trainer.save_weights_and_get_sampling_client()
    assert after.sample(_prompt(PROMPT), 1, GREEDY).result(timeout=60).sequences[0].tokens == [70, 71, 72, 73, 74, 75]
    assert before.sample(_prompt(PROMPT), 1, GREEDY).result(timeout=60).sequences[0].tokens == first  # pinned
    assert before.model_path != after.model_path


def test_seeds_reproduce_samples_and_report_logprobs_and_stop_reasons(alice, trained):
    client = alice.create_sampling_client(model_path=trained[0])
    params = tunemesh.SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, top_k=50, seed=123)
    one = client.sample(_prompt(PROMPT), 3, params).result(timeout=60).sequences
    two = client.sample(_prompt(PROMPT), 3, params).result(timeout=60).sequences
    other = client.sample(_prompt(PROMPT), 3, tunemesh.SamplingParams(
        max_tokens=12, temperature=1.0, top_p=0.95, top_k=50, seed=124)).result(timeout=60).sequences
    assert [s.tokens for s in one] == [s.tokens for s in two]
    assert [s.tokens for s in one] != [s.tokens for s in other]
    assert all(len(s.tokens) == len(s.logprobs) == 12 and s.stop_reason == "length" for s in one)
    assert all(lp <= 0 for s in one for lp in s.logprobs)
    stopped = client.sample(_prompt(PROMPT), 1, tunemesh.SamplingParams(
        max_tokens=6, temperature=0.0, stop=[ANSWER[2]])).result(timeout=60).sequences[0]
    assert (stopped.tokens, stopped.stop_reason) == (ANSWER[:3], "stop")


def test_more_adapters_than_slots_are_loaded_in_turn(mesh, alice):
    trainer = alice.create_lora_training_client(TINY_DENSE, rank=4, seed=7)
    paths = []
    for i in range(4):  # the sampler holds 2
        trainer.forward_backward([tunemesh.Datum(_prompt(PROMPT), {"target_tokens": [50 + i] * 4})], "cross_entropy")
        trainer.optim_step(tunemesh.AdamParams(learning_rate=5e-2))
        paths.append(trainer.save_weights_for_sampler(f"v{i}").result(timeout=60).path)
    clients = [alice.create_sampling_client(model_path=p) for p in paths]
    first = [c.sample(_prompt(PROMPT), 1, GREEDY).result(timeout=60).sequences[0].tokens for c in clients]
    evictions = mesh.sampler.core.adapters.evictions
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda c: c.sample(_prompt(PROMPT), 1, GREEDY).result(timeout=60).sequences[0].tokens,
                              clients + clients))
    assert again == first + first  # reloaded transparently, each with its own weights
    assert mesh.sampler.core.adapters.evictions > evictions
    assert len(mesh.sampler.core.adapters.resident()) <= 2


BAD_SAMPLES = [
    ({"prompt": []}, "EMPTY_PROMPT"),
    ({"prompt": [1, VOCAB]}, "TOKEN_OUT_OF_RANGE"),
    ({"max_tokens": -1}, "BAD_MAX_TOKENS"),
    ({"max_tokens": 10**6}, "CONTEXT_EXCEEDED"),
    ({"num_samples": 17}, "BAD_NUM_SAMPLES"),
    ({"num_samples": 0}, "BAD_NUM_SAMPLES"),
    ({"temperature": float("nan")}, "BAD_TEMPERATURE"),
    ({"top_p": 1.5}, "BAD_TOP_P"),
    ({"top_k": -3}, "BAD_TOP_K"),
    ({"stop_token_ids": [VOCAB + 5]}, "TOKEN_OUT_OF_RANGE"),
]


@pytest.mark.parametrize("change, reason", BAD_SAMPLES, ids=[r for _, r in BAD_SAMPLES])
def test_bad_sample_requests_fail_with_reasons_and_leave_the_engine_serving(mesh, change, reason):
    meta = (("x-api-key", "key-a"),)
    session = mesh.sessions.CreateSession(sessions_pb2.CreateSessionRequest(), metadata=meta).session.name
    name = mesh.sampling.CreateSamplingSession(sampling_pb2.CreateSamplingSessionRequest(
        session=session, base_model=TINY_DENSE), metadata=meta).sampling_session.name
    fields = {"prompt": PROMPT, "max_tokens": 4, "num_samples": 1, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
              "stop_token_ids": []}
    fields.update(change)
    request = sampling_pb2.SampleRequest(sampling_session=name, num_samples=fields["num_samples"])
    request.prompt.chunks.add().encoded_text.tokens.extend(fields["prompt"])
    params = request.sampling_params
    params.max_tokens, params.temperature, params.top_p, params.top_k = (
        fields["max_tokens"], fields["temperature"], fields["top_p"], fields["top_k"])
    params.stop_token_ids.extend(fields["stop_token_ids"])
    batches = mesh.sampling_engine.batches_run
    code, got = status_of(lambda: mesh.sampling.Sample(request, metadata=meta, timeout=30))
    assert (code, got) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert mesh.sampling_engine.batches_run == batches  # rejected before the engine
    good = sampling_pb2.SampleRequest(sampling_session=name, num_samples=1, sampling_params={"max_tokens": 2})
    good.prompt.chunks.add().encoded_text.tokens.extend(PROMPT)
    assert len(mesh.sampling.Sample(good, metadata=meta, timeout=30).sequences[0].tokens) == 2


def test_unknown_or_another_tenants_checkpoint_is_not_found(mesh, alice, trained):
    with tunemesh.ServiceClient(mesh.address, "key-b", retry_policy=FAST_RETRY) as bob:
        with pytest.raises(tunemesh.NotFoundError):
            bob.create_sampling_client(model_path=trained[0])
        with pytest.raises(tunemesh.NotFoundError):
            bob.create_sampling_client(base_model="no/such-model")
    with pytest.raises(tunemesh.NotFoundError):
        alice.create_sampling_client(model_path="tunemesh://runs/nope/sampler/none")
    with pytest.raises(tunemesh.InvalidArgumentError):
        alice.create_sampling_client(model_path="tunemesh://runs/../x")
    meta_b = (("x-api-key", "key-b"),)
    alice_session = alice.create_sampling_client(model_path=trained[0]).sampling_session
    request = sampling_pb2.ComputeLogprobsRequest(sampling_session=alice_session)
    request.prompt.chunks.add().encoded_text.tokens.extend(PROMPT)
    code, reason = status_of(lambda: mesh.sampling.ComputeLogprobs(request, metadata=meta_b, timeout=30))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "SAMPLING_SESSION_NOT_FOUND")
