"""TrainingClient and ServiceClient over a fake channel: seq_ids, retries, futures, close."""

from __future__ import annotations

import threading
import time
import uuid

import grpc
import pytest
from sdk_fakes import FakeChannel
from training_fakes import DATA, FAST, FakeMesh, submitted

import tunemesh


@pytest.fixture()
def mesh():
    return FakeMesh()


@pytest.fixture()
def channel(mesh):
    return FakeChannel(mesh.handlers)


@pytest.fixture()
def service(channel):
    client = tunemesh.ServiceClient("fake:1", "k", retry_policy=FAST, channel=channel)
    yield client
    client.close()


def test_each_call_takes_the_next_seq_id_and_a_fresh_request_id(service, channel):
    trainer = service.create_lora_training_client("m")
    futures = [trainer.forward_backward(DATA), trainer.optim_step(), trainer.forward(DATA),
               trainer.forward_backward(DATA, "importance_sampling", {"beta": 0.1}),
               trainer.optim_step(tunemesh.AdamParams(learning_rate=0.5))]
    assert [f.result(timeout=5).metrics["seq:max"] for f in futures] == [1, 2, 3, 4, 5]
    requests = submitted(channel)
    assert [r.seq_id for r in requests] == [1, 2, 3, 4, 5]
    assert len({r.request_id for r in requests}) == 5
    assert all(uuid.UUID(r.request_id).version == 4 for r in requests)
    assert {r.run for r in requests} == {"runs/r1"}
    assert requests[3].loss_fn_config["beta"].number == pytest.approx(0.1)
    assert requests[4].adam_params.learning_rate == 0.5


def test_concurrent_callers_get_unique_consecutive_seq_ids(service, channel):
    trainer = service.create_lora_training_client("m")
    per_thread: list[list] = []

    def caller():
        mine = [trainer.forward_backward(DATA) for _ in range(25)]
        per_thread.append([f.result(timeout=10).metrics["seq:max"] for f in mine])

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seqs = [r.seq_id for r in submitted(channel)]
    assert seqs == list(range(1, 201))  # unique, gap-free and sent in seq order
    assert all(s == sorted(s) for s in per_thread)  # each caller's calls stay in its order
    assert sorted(x for s in per_thread for x in s) == list(range(1, 201))


def test_retries_reuse_request_id_and_seq_id(service, channel, mesh):
    trainer = service.create_lora_training_client("m")
    mesh.fail_next_submits = 2
    assert trainer.forward_backward(DATA).result(timeout=5).metrics["seq:max"] == 1
    mesh.fail_next_submits = 0
    assert trainer.optim_step().result(timeout=5).metrics["seq:max"] == 2
    attempts = [(r.seq_id, r.request_id) for r in submitted(channel)]
    assert len(attempts) == 4 and len(set(attempts[:3])) == 1 and attempts[3][0] == 2


def test_create_run_retries_with_same_request_id_and_one_lazy_session(service, channel, mesh):
    assert channel.requests("CreateSession") == []
    mesh.fail_next_submits = 1
    trainer = service.create_lora_training_client(
        "m", rank=4, seed=9, train_unembed=False, alpha=8.0)
    mesh.fail_next_submits = 0
    service.create_lora_training_client("m")
    creates = channel.requests("CreateTrainingRun")
    assert len(creates) == 3 and creates[0].request_id == creates[1].request_id
    assert creates[2].request_id != creates[0].request_id
    lora = creates[0].lora_config
    assert (lora.rank, lora.seed, lora.alpha, lora.train_unembed) == (4, 9, 8.0, False)
    assert len(channel.requests("CreateSession")) == 1 and creates[0].session == "sessions/s1"
    assert trainer.model_id == trainer.run == "runs/r1"


def test_bad_datum_raises_at_call_time_without_consuming_a_seq_id(service, channel):
    trainer = service.create_lora_training_client("m")
    with pytest.raises(TypeError):
        trainer.forward_backward([{"not": "a datum"}])
    with pytest.raises(TypeError):
        trainer.forward(DATA, loss_fn_config={"bad": object()})
    trainer.forward(DATA).result(timeout=5)
    assert [r.seq_id for r in submitted(channel)] == [1]


def test_a_failed_operation_fails_only_its_future(service):
    trainer = service.create_lora_training_client("m")
    bad = trainer.forward_backward(DATA, loss_fn="nan")
    good = trainer.forward_backward(DATA)
    with pytest.raises(tunemesh.InvalidArgumentError) as info:
        bad.result(timeout=5)
    assert info.value.reason == "NON_FINITE_LOSS"
    assert good.result(timeout=5).metrics["seq:max"] == 2


def test_rejected_submit_frees_its_seq_id_and_unclear_ones_are_resent_not_skipped(service, channel,
                                                                                 mesh):
    """INVALID_ARGUMENT: the next call takes the seq_id. INTERNAL every time: the submit is
    re-sent before the next calls (failing them) until MAX_UNCLEAR_ANSWERS, then given up
    and its seq_id goes to the next call: never skipped, so no gap stalls the run."""
    mesh.reject = {"bad": grpc.StatusCode.INVALID_ARGUMENT, "boom": grpc.StatusCode.INTERNAL}
    trainer = service.create_lora_training_client("m")
    futures = [trainer.forward_backward(DATA, loss_fn) for loss_fn in
               ("bad", "cross_entropy", "boom", "cross_entropy", "cross_entropy")]
    with pytest.raises(tunemesh.InvalidArgumentError):
        futures[0].result(timeout=5)
    assert futures[1].result(timeout=5).metrics["seq:max"] == 1
    for failed in futures[2:4]:
        with pytest.raises(tunemesh.InternalError):
            failed.result(timeout=5)
    assert futures[4].result(timeout=5).metrics["seq:max"] == 2
    sent = submitted(channel)
    assert [r.seq_id for r in sent] == [1, 1, 2, 2, 2, 2]
    assert [r.loss_fn for r in sent[2:]] == ["boom", "boom", "boom", "cross_entropy"]
    assert len({r.request_id for r in sent[2:5]}) == 1


def test_operation_done_at_submit_needs_no_wait(service, channel, mesh):
    mesh.done_at_submit = True
    trainer = service.create_lora_training_client("m")
    assert trainer.optim_step().result(timeout=5).metrics["seq:max"] == 1
    assert channel.requests("WaitOperation") == []


def test_close_fails_pending_futures_and_ends_the_session(service, channel, mesh):
    mesh.hang = True
    trainer = service.create_lora_training_client("m")
    pending = trainer.forward_backward(DATA)
    time.sleep(0.05)
    service.close()
    with pytest.raises(tunemesh.ClientClosedError):
        pending.result(timeout=5)
    with pytest.raises(tunemesh.ClientClosedError):
        trainer.optim_step().result(timeout=5)
    assert [r.session for r in channel.requests("EndSession")] == ["sessions/s1"]
    assert channel.closed


def test_defaults_come_from_the_environment(monkeypatch, channel):
    monkeypatch.setenv("TUNEMESH_ADDRESS", "example:123")
    monkeypatch.setenv("TUNEMESH_API_KEY", "env-key")
    with tunemesh.ServiceClient(channel=channel, retry_policy=FAST) as client:
        client.session
    assert client.address == "example:123"
    assert channel.calls[0][2]["authorization"] == "Bearer env-key"


def test_a_submit_in_doubt_is_resent_before_the_next_call_so_no_gap_forms(channel, mesh):
    """Retries ran out on UNAVAILABLE: the next call first re-sends that submit unchanged."""
    quick = tunemesh.RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.002, total_timeout_s=0.1)
    with tunemesh.ServiceClient("fake:1", "k", retry_policy=quick, channel=channel) as service:
        trainer = service.create_lora_training_client("m")
        mesh.fail_next_submits = 10**6
        with pytest.raises(tunemesh.UnavailableError):
            trainer.forward_backward(DATA).result(timeout=5)
        first = submitted(channel)[-1]
        mesh.fail_next_submits = 0
        mesh.flaky.clear()
        assert trainer.optim_step().result(timeout=5).metrics["seq:max"] == 2
    sent = submitted(channel)
    resent, optim = sent[-2], sent[-1]
    assert (resent.request_id, resent.seq_id) == (first.request_id, 1)
    assert type(resent).__name__ == "ForwardBackwardRequest"
    assert optim.seq_id == 2


def test_unnamed_sampler_weights_are_ephemeral_and_named_ones_are_kept(service, channel):
    """save_weights_and_get_sampling_client() without a name saves with a 1 h TTL (as
    Tinker's unnamed sampler weights are ephemeral); a named save keeps no TTL."""
    trainer = service.create_lora_training_client("m")
    trainer._sampling_client_for = lambda model_path: model_path  # the sampling client: its path
    assert trainer.save_weights_and_get_sampling_client() == "tunemesh://runs/r1/sampler/auto-000001"
    assert trainer.save_weights_and_get_sampling_client("keep") == "tunemesh://runs/r1/sampler/keep"
    trainer.save_weights_for_sampler().result(timeout=5)  # the plain save is unchanged: no TTL
    saves = channel.requests("SaveWeightsForSampler")
    assert [(r.name, r.ttl_seconds) for r in saves] == [("", 3600), ("keep", 0), ("", 0)]
    assert tunemesh.training_client.EPHEMERAL_SAMPLER_TTL_S == 3600
