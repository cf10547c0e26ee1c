"""Sampling from an expert-LoRA checkpoint through the public API on tiny-moe: a run with
train_experts trains, saves for the sampler, and the sampler (torch engine) serves it with
the trainer's own logprobs; all real servicers in process."""

from __future__ import annotations

import numpy as np
import pytest

import tunemesh
from loop_thread import LoopThread
from mesh_harness import Mesh
from tunemesh_common.models import TINY_MOE, ModelRegistry

PROMPT = [5, 6, 7, 8]
ANSWER = [40, 41, 42, 43, 44, 45]
GREEDY = tunemesh.SamplingParams(max_tokens=6, temperature=0.0)
PATIENT = tunemesh.RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, total_timeout_s=300.0, attempt_timeout_s=60.0)


@pytest.fixture(scope="module")
def moe_mesh(tmp_path_factory):
    from tunemesh_sampler.engine import build_torch_engine as build_sampling_engine
    from tunemesh_trainer.engine import build_torch_engine

    registry = ModelRegistry.default(tmp_path_factory.mktemp("moe_data"))
    entry, path = registry.entry(TINY_MOE), registry.materialize(TINY_MOE)
    sizes = dict(name=entry.name, family=entry.family, max_lora_rank=entry.max_lora_rank, max_seq_len=entry.max_seq_len,
                 num_threads=2)
    engine = build_torch_engine(path, **sizes)
    sampling_engine = build_sampling_engine(path, **sizes)
    loop = LoopThread()
    mesh = Mesh(loop, engine, path, tmp_path_factory.mktemp("moe_checkpoints"), sampling_engine)
    yield mesh
    mesh.close()
    loop.close()
    sampling_engine.close()


@pytest.fixture(scope="module")
def trained(moe_mesh):
    """A train_experts run taught PROMPT -> ANSWER, its sampling client and the trainer's
    forward logprobs of PROMPT + ANSWER."""
    with tunemesh.ServiceClient(moe_mesh.address, "key-a", retry_policy=PATIENT) as service:
        trainer = service.create_lora_training_client(TINY_MOE, rank=4, seed=4, train_mlp=False, train_experts=True)
        tokens = PROMPT + ANSWER
        datum = tunemesh.Datum(tunemesh.ModelInput.from_ints(tokens[:-1]), {
            "target_tokens": tokens[1:], "weights": [0.0] * (len(PROMPT) - 1) + [1.0] * len(ANSWER)})
        for _ in range(20):
            trainer.forward_backward([datum], "cross_entropy")
            trainer.optim_step(tunemesh.AdamParams(learning_rate=2e-2))
        sampler = trainer.save_weights_and_get_sampling_client()
        forward = trainer.forward([datum], "cross_entropy").result(timeout=60)
        base = service.create_sampling_client(base_model=TINY_MOE)
        yield sampler, base, forward.loss_fn_outputs[0]["logprobs"].to_numpy(), tokens, trainer


def test_the_sampler_serves_the_checkpoints_expert_factors(moe_mesh, trained):
    sampler, *_ = trained
    sampler.compute_logprobs(tunemesh.ModelInput.from_ints(PROMPT)).result(timeout=60)  # loaded now
    experts = moe_mesh.sampling_engine._targets.experts  # white-box: which factors the engine holds
    held = {key for layer in experts.values() for pairs in layer.pairs.values() for key in pairs}
    assert len(experts) == 2 and len(held) == 1  # tiny-moe's two MoE layers carry the run's adapter


def test_compute_logprobs_of_the_expert_checkpoint_match_the_trainers_forward(trained):
    sampler, base, trainer_logprobs, tokens, _ = trained
    tuned = sampler.compute_logprobs(tunemesh.ModelInput.from_ints(tokens))
    plain = base.compute_logprobs(tunemesh.ModelInput.from_ints(tokens))
    tuned, plain = tuned.result(timeout=60), plain.result(timeout=60)
    np.testing.assert_allclose(np.array(tuned[1:]), trainer_logprobs, atol=1e-4, rtol=0)
    assert np.abs(np.array(plain[1:]) - trainer_logprobs).max() > 0.1  # the adapter changed the model


def test_greedy_samples_carry_the_trainers_logprobs(trained):
    sampler, base, _, _, trainer = trained
    tuned = sampler.sample(tunemesh.ModelInput.from_ints(PROMPT), 1, GREEDY)  # in flight together: one batch
    plain = base.sample(tunemesh.ModelInput.from_ints(PROMPT), 1, GREEDY)
    tuned, plain = tuned.result(timeout=60).sequences[0], plain.result(timeout=60).sequences[0]
    assert tuned.tokens == ANSWER != plain.tokens
    sequence = PROMPT + tuned.tokens
    datum = tunemesh.Datum(tunemesh.ModelInput.from_ints(sequence[:-1]), {"target_tokens": sequence[1:]})
    forward = trainer.forward([datum], "cross_entropy").result(timeout=60).loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(tuned.logprobs, forward[len(PROMPT) - 1:], atol=1e-4, rtol=0)
