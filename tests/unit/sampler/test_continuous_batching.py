"""The torch engine's continuous batching: rows join a running decode loop and leave it as
they finish, waiting rows are admitted across tenants in turn, scoring runs between steps
(the tiny dense model, HF / PEFT references)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from tunemesh_sampler.domain import GenerateRequest, SamplingSpec
from tunemesh_sampler.engine.torch_engine import _FairRows

from test_torch_sampling_engine import PROMPTS, SAMPLED, _hf_greedy, _hf_logprobs


def _request(key, prompt, spec, num_samples=1, tenant="") -> GenerateRequest:
    return GenerateRequest(adapter_key=key, prompt_tokens=tuple(prompt), num_samples=num_samples, spec=spec,
                           tenant=tenant)


async def _until(predicate) -> None:
    """Yield to the event loop (and the engine's worker) until `predicate()` holds."""
    while not predicate():
        await asyncio.sleep(0.001)


@pytest.fixture
def small_engine(model_dir, adapter_dirs, engine):
    """A second engine with 2 row slots."""
    from tunemesh_sampler.engine import build_torch_engine

    info = engine.info
    small = build_torch_engine(model_dir, "tiny", "dense", info.max_lora_rank, info.max_seq_len, max_batch_rows=2)
    small.load_adapter("a1", adapter_dirs["a1"])
    small.load_adapter("a2", adapter_dirs["a2"])
    yield small
    small.close()


def test_a_short_request_joins_a_running_generation_and_both_stay_exact(engine, reference_models):
    """B arrives while A's long generation decodes: B is prefilled and joins A's loop (no
    second loop), finishes first, and both rows' greedy tokens equal HF generate on their
    own (so merging caches of different lengths mid-loop changed no number that matters);
    B's sampled rows equal the same request alone."""
    long_prompt, long_tokens = PROMPTS["a2"], 110  # 9 + 110 tokens: within the 128 of the model

    async def scenario():
        before = engine.batches_run
        long = asyncio.ensure_future(engine.generate(_request(None, long_prompt, SamplingSpec(max_tokens=long_tokens))))
        await _until(lambda: engine.batches_run > before or long.done())
        short = await engine.generate(_request("a1", PROMPTS["a1"], SamplingSpec(max_tokens=6)))
        long_running_when_short_ended = not long.done()
        sampled = await engine.generate(_request(None, PROMPTS[None], SAMPLED, num_samples=2))
        return short, sampled, long_running_when_short_ended, await long, engine.batches_run - before

    short, sampled, overlapped, long, prefills = asyncio.run(scenario())
    assert overlapped  # the short request did not wait for the long one
    assert prefills == 3  # one prefill each: the later ones joined the running loop
    assert list(short[0].tokens) == _hf_greedy(reference_models["a1"], PROMPTS["a1"], 6)
    assert list(long[0].tokens) == _hf_greedy(reference_models[None], long_prompt, long_tokens)
    assert len(long[0].tokens) == long_tokens  # no early end of sequence: it ran through the others
    reference = _hf_logprobs(reference_models["a1"], PROMPTS["a1"] + short[0].tokens)[len(PROMPTS["a1"]) - 1:]
    np.testing.assert_allclose(short[0].logprobs, reference, atol=1e-4)
    (alone,) = [asyncio.run(engine.generate(_request(None, PROMPTS[None], SAMPLED, num_samples=2)))]
    assert [s.tokens for s in sampled] == [s.tokens for s in alone]


def test_waiting_rows_are_admitted_across_tenants_in_turn(small_engine, monkeypatch):
    """Two slots; tenant A asks for 6 rows, then tenant B for 1: B's row gets the second
    slot of the first prefill instead of waiting behind A's other five."""
    joined: list[list[str]] = []  # the tenants of each prefill's rows, in order
    join = small_engine._join

    def recorded(batch, rows):
        joined.append([row.job.request.tenant for row in rows])
        return join(batch, rows)

    monkeypatch.setattr(small_engine, "_join", recorded)

    async def scenario():
        spec = SamplingSpec(max_tokens=8)
        gate = threading.Event()  # holds the engine's one worker thread until both requests wait
        small_engine._executor.submit(gate.wait, 10)
        many = asyncio.ensure_future(small_engine.generate(_request("a1", PROMPTS["a1"], spec, 6, tenant="A")))
        one = asyncio.ensure_future(small_engine.generate(_request("a2", PROMPTS["a2"], spec, 1, tenant="B")))
        for _ in range(3):  # both coroutines queue their rows
            await asyncio.sleep(0)
        gate.set()
        await one
        return many.done(), await many

    a_done_first, many = asyncio.run(scenario())
    assert joined[0] == ["A", "B"] and not a_done_first
    assert sorted(t for rows in joined for t in rows) == ["A"] * 6 + ["B"]
    assert len({s.tokens for s in many}) == 1  # greedy: every row of A the same, wherever it ran


def test_scoring_runs_between_decode_steps(engine, reference_models):
    tokens = (1, 500, 20, 33, 900, 4)

    async def scenario():
        before = engine.batches_run
        long = asyncio.ensure_future(engine.generate(_request(None, PROMPTS["a2"], SamplingSpec(max_tokens=110))))
        await _until(lambda: engine.batches_run > before or long.done())
        scored = await engine.prompt_logprobs("a1", tokens)
        return scored, not long.done(), await long

    scored, during, _ = asyncio.run(scenario())
    assert during
    np.testing.assert_allclose(scored, _hf_logprobs(reference_models["a1"], tokens), atol=1e-5)


def test_rows_leave_as_they_finish_and_free_their_slot(small_engine, reference_models):
    """Two slots, three requests of different lengths: the third starts when the shortest
    ends, not when both first ones have; every row exact."""

    async def scenario():
        requests = [_request("a1", PROMPTS["a1"], SamplingSpec(max_tokens=40)),
                    _request("a2", PROMPTS["a2"], SamplingSpec(max_tokens=3)),
                    _request(None, PROMPTS[None], SamplingSpec(max_tokens=5))]
        tasks = [asyncio.ensure_future(small_engine.generate(r)) for r in requests]
        await tasks[2]
        return not tasks[0].done(), [await t for t in tasks]

    third_before_first, results = asyncio.run(scenario())
    assert third_before_first
    for (key, new), (sequence,) in zip((("a1", 40), ("a2", 3), (None, 5)), results):
        assert list(sequence.tokens) == _hf_greedy(reference_models[key], PROMPTS[key], new), key


def test_fair_rows_take_tenants_in_turn():
    rows = _FairRows()
    rows.add("a", ["a1", "a2", "a3"])
    rows.add("b", ["b1"])
    rows.add("c", ["c1", "c2"])
    rows.add("a", ["a4"])
    taken = []
    while (row := rows.pop()) is not None:
        taken.append(row)
        if row == "b1":
            rows.add("b", ["b2"])  # arrives meanwhile: joins b's turn
    assert taken == ["a1", "b1", "c1", "a2", "b2", "c2", "a3", "a4"]
    assert not rows
