"""Checkpoints through the public API: SDK -> scheduler -> trainer -> checkpoint service,
all real servicers in process (see mesh_harness.py)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

import tunemesh
from mesh_harness import FAST_RETRY, status_of
from tunemesh.v1 import checkpoints_pb2, training_pb2
from tunemesh_common.models import TINY_DENSE

ADAM = tunemesh.AdamParams(learning_rate=2e-2, weight_decay=0.01)
B_KEY = (("authorization", "Bearer key-b"),)


def _datum(seed: int) -> tunemesh.Datum:
    tokens = list(np.random.default_rng(seed).integers(5, 900, 17))
    return tunemesh.Datum(tunemesh.ModelInput.from_ints(tokens[:-1]),
                          {"target_tokens": tokens[1:], "weights": [1.0] * 16})


def _train(trainer: tunemesh.TrainingClient, steps: range) -> list[float]:
    """One forward_backward + optim_step per step, on data fixed by the step number."""
    futures, steps_done = [], []
    for step in steps:
        futures.append(trainer.forward_backward([_datum(step), _datum(step + 1000)], "cross_entropy"))
        steps_done.append(trainer.optim_step(ADAM))
    losses = [f.result(timeout=60).metrics["loss:sum"] for f in futures]
    for done in steps_done:  # the last step must have landed before anyone digests the adapter
        done.result(timeout=60)
    return losses


def _probe_logprobs(trainer: tunemesh.TrainingClient) -> np.ndarray:
    out = trainer.forward([_datum(7)], "cross_entropy").result(timeout=60)
    return out.loss_fn_outputs[0]["logprobs"].to_numpy()


@pytest.fixture()
def alice(mesh, tmp_path):
    with tunemesh.ServiceClient(mesh.address, "key-a", retry_policy=FAST_RETRY, tokenizer_cache_dir=tmp_path) as s:
        yield s


@pytest.fixture()
def bob(mesh, tmp_path):
    with tunemesh.ServiceClient(mesh.address, "key-b", retry_policy=FAST_RETRY, tokenizer_cache_dir=tmp_path) as s:
        yield s


def test_resume_with_optimizer_matches_the_uninterrupted_run_bit_for_bit(mesh, alice):
    twin = alice.create_lora_training_client(TINY_DENSE, rank=4, seed=3)
    _train(twin, range(3))
    saved = twin.save_state("after-3").result(timeout=60)
    twin_losses = _train(twin, range(3, 6))
    twin_digest = mesh.engine.adapter_digest(twin.run)

    resumed = alice.create_training_client_from_state_with_optimizer(saved.path)
    assert resumed.get_info().step == 3
    resumed_losses = _train(resumed, range(3, 6))
    restarted = alice.create_training_client_from_state(saved.path)
    assert restarted.get_info().step == 0
    restarted_losses = _train(restarted, range(3, 6))

    assert resumed_losses == twin_losses  # exact, not approximate
    assert mesh.engine.adapter_digest(resumed.run) == twin_digest
    assert restarted_losses[0] == twin_losses[0]  # same weights before the first new step
    assert restarted_losses[1:] != twin_losses[1:]  # fresh AdamW moments step differently
    assert resumed.get_info().step == 6


def test_save_state_records_what_it_holds(alice):
    trainer = alice.create_lora_training_client(TINY_DENSE, rank=4, seed=1)
    _train(trainer, range(2))
    state = trainer.save_state("s2", ttl_seconds=7200, user_metadata={"note": "two steps"}).result(timeout=60)
    sampler = trainer.save_weights_for_sampler("w2").result(timeout=60)
    run_id = trainer.run.split("/", 1)[1]
    assert state.path == f"tunemesh://runs/{run_id}/state/s2"
    assert sampler.path == f"tunemesh://runs/{run_id}/sampler/w2"
    ck = state.checkpoint
    assert (ck.kind, ck.step, ck.has_optimizer_state, ck.user_metadata) == ("state", 2, True, {"note": "two steps"})
    assert {f.name for f in ck.files} == {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors"}
    assert ck.expire_time is not None and sampler.checkpoint.expire_time is None
    assert {f.name for f in sampler.checkpoint.files} == {"adapter_config.json", "adapter_model.safetensors"}
    listed = [c.path for c in alice.create_checkpoint_client().list(run=trainer.run)]
    assert listed == sorted([sampler.path, state.path])


def test_names_are_immutable_and_unnamed_saves_get_fresh_versions(alice):
    trainer = alice.create_lora_training_client(TINY_DENSE, rank=4)
    first = trainer.save_weights_for_sampler().result(timeout=60)
    second = trainer.save_weights_for_sampler().result(timeout=60)
    assert first.path != second.path and first.path.rsplit("/", 1)[1].startswith("auto-")
    trainer.save_state("keep").result(timeout=60)
    with pytest.raises(tunemesh.AlreadyExistsError) as info:
        trainer.save_state("keep").result(timeout=60)
    assert info.value.reason == "CHECKPOINT_EXISTS"
    _train(trainer, range(1))  # the failed save did not stall the run


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 129, "a\x00b", "%2e%2e", "auto-7", "é"])
def test_bad_names_are_refused_before_anything_runs(mesh, name):
    run = _raw_run(mesh)
    before = dict(mesh.trainer.calls)
    request = training_pb2.SaveStateRequest(run=run, seq_id=1, name=name)
    if not name:  # an empty name is allowed (auto); give it a bad TTL instead
        request.ttl_seconds = -5
    code, reason = status_of(lambda: mesh.training.SaveState(request, metadata=(("x-api-key", "key-a"),)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in ("BAD_CHECKPOINT_NAME", "BAD_TTL")
    assert dict(mesh.trainer.calls) == before


@pytest.mark.parametrize("path", [
    "tunemesh://runs/../state/x", "tunemesh://runs/a/state/%2e%2e", "/etc/passwd", "tunemesh://imports/../../x",
    "tunemesh://runs/a/state/x/y", "file:///etc/passwd",
])
def test_bad_paths_are_invalid_argument(mesh, path):
    run = _raw_run(mesh)
    request = training_pb2.LoadStateRequest(run=run, seq_id=1, path=path)
    code, reason = status_of(lambda: mesh.training.LoadState(request, metadata=(("x-api-key", "key-a"),)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_CHECKPOINT_PATH")


def test_another_tenants_checkpoint_is_not_found_everywhere(mesh, alice, bob, tmp_path):
    path = alice.create_lora_training_client(TINY_DENSE, rank=4).save_state("private").result(timeout=60).path
    bobs = bob.create_checkpoint_client()
    for call in (lambda: bobs.get(path), lambda: bobs.delete(path), lambda: bobs.set_ttl(path, 3600),
                 lambda: bobs.download(path, tmp_path / "stolen"),
                 lambda: bob.create_training_client_from_state(path),
                 lambda: bob.create_lora_training_client(TINY_DENSE, rank=4).load_state(path).result(timeout=30)):
        with pytest.raises(tunemesh.NotFoundError):
            call()
    assert path not in [c.path for c in bobs.list()]
    assert not (tmp_path / "stolen").exists() or not any((tmp_path / "stolen").iterdir())
    assert alice.create_checkpoint_client().get(path).path == path


def test_load_state_is_ordered_with_the_runs_other_calls(mesh, alice):
    source = alice.create_lora_training_client(TINY_DENSE, rank=4, seed=3)
    _train(source, range(2))
    path = source.save_state("two").result(timeout=60).path
    reference = alice.create_training_client_from_state_with_optimizer(path)
    reference_lp = _probe_logprobs(reference)

    target = alice.create_lora_training_client(TINY_DENSE, rank=4, seed=3)
    target.forward_backward([_datum(50)], "cross_entropy")
    target.optim_step(ADAM)  # pipelined: the load lands after these, the forward after it
    loaded = target.load_state_with_optimizer(path)
    probe = target.forward([_datum(7)], "cross_entropy")
    assert loaded.result(timeout=60).step == 2
    np.testing.assert_array_equal(probe.result(timeout=60).loss_fn_outputs[0]["logprobs"].to_numpy(), reference_lp)
    assert mesh.engine.adapter_digest(target.run) == mesh.engine.adapter_digest(reference.run)


def test_loads_that_do_not_fit_fail_with_a_reason(alice):
    source = alice.create_lora_training_client(TINY_DENSE, rank=4)
    sampler_path = source.save_weights_for_sampler("w").result(timeout=60).path
    other_rank = alice.create_lora_training_client(TINY_DENSE, rank=8)
    with pytest.raises(tunemesh.FailedPreconditionError) as info:
        other_rank.load_state(sampler_path).result(timeout=30)
    assert info.value.reason == "LORA_CONFIG_MISMATCH"
    with pytest.raises(tunemesh.FailedPreconditionError) as info:
        source.load_state_with_optimizer(sampler_path).result(timeout=30)
    assert info.value.reason == "NO_OPTIMIZER_STATE"
    assert source.load_state(sampler_path).result(timeout=30).step == 0


def test_download_is_a_peft_adapter_with_the_trainers_logits_and_imports_back(mesh, alice, bob, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = alice.create_lora_training_client(TINY_DENSE, rank=4, seed=9)
    _train(trainer, range(3))
    path = trainer.save_weights_for_sampler("export").result(timeout=60).path
    trained_lp = _probe_logprobs(trainer)
    seen = []
    directory = alice.create_checkpoint_client().download(path, tmp_path / "peft", progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1]

    base = AutoModelForCausalLM.from_pretrained(mesh.model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, directory).eval()
    datum = _datum(7)
    tokens = datum.model_input.to_ints()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0]
    targets = torch.tensor(datum.loss_fn_inputs["target_tokens"].to_numpy())
    peft_lp = torch.log_softmax(logits, -1)[torch.arange(len(tokens)), targets].numpy()
    np.testing.assert_allclose(trained_lp, peft_lp, rtol=1e-5, atol=1e-5)

    imported = bob.create_checkpoint_client().import_peft(directory, base_model=TINY_DENSE, name="from-alice")
    assert imported.path == "tunemesh://imports/from-alice" and imported.kind == "imported"
    continued = bob.create_training_client_from_state(imported.path)
    np.testing.assert_allclose(_probe_logprobs(continued), trained_lp, rtol=1e-6, atol=1e-6)
    _train(continued, range(1))  # and it trains


def test_checkpoint_management_round_trip(mesh, alice):
    checkpoints = alice.create_checkpoint_client()
    trainer = alice.create_lora_training_client(TINY_DENSE, rank=4)
    paths = [trainer.save_weights_for_sampler(f"v{i}").result(timeout=60).path for i in range(5)]
    pages, token = [], ""
    while True:
        page, token = checkpoints.list_page(run=trainer.run, page_size=2, page_token=token)
        pages.append([c.path for c in page])
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2, 1] and sum(pages, []) == sorted(paths)
    assert checkpoints.set_ttl(paths[0], 3600).expire_time is not None
    assert checkpoints.set_ttl(paths[0], None).expire_time is None
    checkpoints.delete(paths[1])
    with pytest.raises(tunemesh.NotFoundError):
        checkpoints.get(paths[1])
    response = mesh.checkpoints.GetCheckpoint(checkpoints_pb2.GetCheckpointRequest(path=paths[2]),
                                              metadata=(("x-api-key", "key-a"),))
    assert response.checkpoint.kind == checkpoints_pb2.CHECKPOINT_KIND_SAMPLER
    code, _ = status_of(lambda: mesh.checkpoints.GetCheckpoint(
        checkpoints_pb2.GetCheckpointRequest(path=paths[2]), metadata=B_KEY))
    assert code == grpc.StatusCode.NOT_FOUND


def _raw_run(mesh) -> str:
    return mesh.new_run(metadata=(("x-api-key", "key-a"),))


def test_a_save_past_the_tenants_storage_quota_fails_with_a_reason_and_leaves_nothing(mesh, bob):
    from tunemesh_common.checkpoints.paths import tenant_segment

    trainer = bob.create_lora_training_client(TINY_DENSE, rank=4)
    usage = mesh.catalog.usage
    usage.limit_bytes = usage.used(tenant_segment("tenant-b")) + 1  # room for one byte: refused mid-stream
    try:
        with pytest.raises(tunemesh.ResourceExhaustedError) as info:
            trainer.save_weights_for_sampler("over-quota").result(timeout=60)
        assert info.value.reason == "STORAGE_QUOTA"
        assert not [p for p in (mesh.checkpoint_root / "staging").iterdir()]  # no partial write left
        assert list(bob.create_checkpoint_client().list(trainer.run)) == []
        _train(trainer, range(1))  # the failed save did not stall the run
    finally:
        usage.limit_bytes = 0
    assert trainer.save_weights_for_sampler("fits-now").result(timeout=60).path.endswith("/fits-now")
