"""The vLLM engine's own logic on a fake `AsyncLLM` (vllm imported for its parameter types,
no model started): each call its own vLLM request, a failure fails its request alone,
prompt logprobs alone in the engine, adapter ids per key, cancellation and close. The
real engine runs in tests/contract/test_vllm_engine_lifecycle.py (slow)."""

from __future__ import annotations

import asyncio
import json
import threading
import types

import pytest

pytest.importorskip("vllm")

from tunemesh.errors import InvalidArgumentError, NotFoundError, UnavailableError  # noqa: E402
from tunemesh_common.lora import peft_format  # noqa: E402
from tunemesh_sampler.domain import GenerateRequest, ModelInfo, SamplingSpec, StopReason  # noqa: E402
from tunemesh_sampler.engine.loop_thread import LoopThread  # noqa: E402
from tunemesh_sampler.engine.vllm_engine import BASE_KEY, VllmSamplingEngine  # noqa: E402

REFUSED, CRASHES, HELD = 901, 902, 903  # first prompt tokens the fake treats specially
GREEDY = SamplingSpec(max_tokens=3)


class FakeAsyncLLM:
    """The slice of `AsyncLLM` the engine uses. A generation answers [lora id, prompt length,
    0...]; prompts starting with REFUSED / CRASHES fail as vLLM would, HELD waits for `release`."""

    def __init__(self) -> None:
        self.inside: dict[str, bool] = {}  # request id -> wants prompt logprobs
        self.overlaps: list[tuple[bool, int]] = []  # (prompt logprobs?, requests inside with it)
        self.params: list = []
        self.added, self.removed, self.cancelled = [], [], []
        self.release = asyncio.Event()
        self.shut_down = False

    async def add_lora(self, lora) -> bool:
        if "bad" in lora.lora_path:
            raise Exception("Call to add_lora method failed: shape mismatch")  # what the engine core sends
        self.added.append(lora)
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        return True

    async def generate(self, prompt, params, request_id, *, lora_request=None):
        tokens, scoring = prompt["prompt_token_ids"], params.prompt_logprobs is not None
        self.params.append(params)
        self.inside[request_id] = scoring
        try:
            await asyncio.sleep(0.05)  # the others join the same engine steps meanwhile
            self.overlaps.append((scoring, len(self.inside)))
            if tokens[0] == REFUSED:
                from vllm.exceptions import VLLMValidationError

                raise VLLMValidationError(f"Token id {tokens[0]} is out of vocabulary")
            if tokens[0] == CRASHES:
                raise RuntimeError("a kernel failed")
            if tokens[0] == HELD:
                await self.release.wait()
            yield _output(tokens, params, lora_request.lora_int_id)
        except asyncio.CancelledError:
            self.cancelled.append(request_id)
            raise
        finally:
            del self.inside[request_id]

    def shutdown(self) -> None:
        self.shut_down = True


def _output(tokens, params, lora_id: int):
    new = [lora_id, len(tokens)] + [0] * (params.max_tokens - 2)
    completion = types.SimpleNamespace(token_ids=new, finish_reason="length",
                                       logprobs=[{t: types.SimpleNamespace(logprob=-0.5)} for t in new])
    prompt_logprobs = [None] + [{t: types.SimpleNamespace(logprob=-float(i))} for i, t in enumerate(tokens[1:], 1)]
    return types.SimpleNamespace(finished=True, outputs=[completion] * params.n, prompt_logprobs=prompt_logprobs)


@pytest.fixture
def fake_engine(tmp_path):
    fake = FakeAsyncLLM()
    engine = VllmSamplingEngine(LoopThread("vllm-engine"), fake, ModelInfo("fake", "dense", 1000, 64, 8))
    engine.add_base_adapter(tmp_path)
    yield engine, fake
    engine.close()


def _adapter(directory, rank: int = 4):
    directory.mkdir()
    config = peft_format.build_config("fake", rank, 2.0 * rank, ["model.layers.0.self_attn.q_proj"])
    (directory / peft_format.CONFIG_FILE).write_text(json.dumps(config))
    return directory


def test_each_call_is_its_own_vllm_request_and_a_failing_one_fails_alone(fake_engine):
    engine, fake = fake_engine

    async def four():
        prompts = [(5, 6), (REFUSED, 6), (CRASHES, 6), (7, 8, 9)]
        return await asyncio.gather(*(engine.generate(GenerateRequest(None, p, 1, GREEDY)) for p in prompts),
                                    return_exceptions=True)

    ok, refused, crashed, ok2 = asyncio.run(four())
    base_id = engine._loras[BASE_KEY].lora_int_id
    assert [s.tokens for s in ok] == [(base_id, 2, 0)] and [s.tokens for s in ok2] == [(base_id, 3, 0)]
    assert ok[0].stop_reason is StopReason.LENGTH and ok[0].logprobs == (-0.5, -0.5, -0.5)
    assert isinstance(refused, InvalidArgumentError) and refused.reason == "ENGINE_REJECTED"
    assert "out of vocabulary" in str(refused)
    assert isinstance(crashed, UnavailableError) and crashed.reason == "ENGINE_ERROR"
    assert max(n for _, n in fake.overlaps) == 4  # all four were in the engine at once
    assert engine.batches_run == 4
    again = asyncio.run(engine.generate(GenerateRequest(None, (5, 6), 1, GREEDY)))
    assert again == ok  # the engine goes on serving


def test_prompt_logprobs_run_alone_and_generations_together(fake_engine):
    engine, fake = fake_engine

    async def mixed():
        def generation(i: int):
            return engine.generate(GenerateRequest(None, (i, 2), 1, GREEDY))

        return await asyncio.gather(generation(0), generation(1), engine.prompt_logprobs(None, (4, 5, 6)),
                                    engine.prompt_logprobs(None, (7, 8)), generation(2), generation(3))

    _, _, first, second, _, _ = asyncio.run(mixed())
    assert (first, second) == ([-1.0, -2.0], [-1.0])
    # in arrival order: two generations together, each scoring request alone, two generations together
    assert fake.overlaps == [(False, 2), (False, 1), (True, 1), (True, 1), (False, 2), (False, 1)]


def test_greedy_samples_are_copies_and_sampled_ones_ask_vllm_for_n(fake_engine):
    engine, fake = fake_engine
    greedy = asyncio.run(engine.generate(GenerateRequest(None, (1, 2), 3, GREEDY)))
    sampled = asyncio.run(engine.generate(GenerateRequest(None, (1, 2), 3, SamplingSpec(3, temperature=1.0, seed=4))))
    assert len(greedy) == len(sampled) == 3
    assert [(p.n, p.temperature, p.seed) for p in fake.params] == [(1, 0.0, None), (3, 1.0, 4)]  # vLLM: n=1 if greedy


def test_each_adapter_key_is_a_new_lora_request_id(fake_engine, tmp_path):
    engine, fake = fake_engine
    engine.load_adapter("a@v1", _adapter(tmp_path / "a1"))
    first = engine._loras["a@v1"].lora_int_id
    (sequence,) = asyncio.run(engine.generate(GenerateRequest("a@v1", (1,), 1, GREEDY)))
    assert sequence.tokens[0] == first
    engine.unload_adapter("a@v1")
    assert fake.removed == [first]
    with pytest.raises(NotFoundError):
        asyncio.run(engine.generate(GenerateRequest("a@v1", (1,), 1, GREEDY)))
    engine.load_adapter("a@v1", _adapter(tmp_path / "a2"))
    assert engine._loras["a@v1"].lora_int_id not in {first, engine._loras[BASE_KEY].lora_int_id}
    with pytest.raises(InvalidArgumentError) as refused:
        engine.load_adapter("b", _adapter(tmp_path / "bad"))
    assert refused.value.reason == "BAD_ADAPTER" and "b" not in engine._loras
    with pytest.raises(InvalidArgumentError) as too_big:
        engine.load_adapter("c", _adapter(tmp_path / "c", rank=16))
    assert too_big.value.reason == "BAD_LORA_RANK"


def test_cancelling_a_caller_aborts_its_vllm_request_and_frees_the_gate(fake_engine):
    engine, fake = fake_engine

    async def cancel_one():
        held = asyncio.ensure_future(engine.generate(GenerateRequest(None, (HELD, 1), 1, GREEDY)))
        while not fake.inside:
            await asyncio.sleep(0.01)
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        return await asyncio.wait_for(engine.prompt_logprobs(None, (1, 2)), 5)  # needs the engine to itself

    assert asyncio.run(cancel_one()) == [-1.0]
    assert fake.cancelled == ["tunemesh-1"] and not fake.inside


def test_close_shuts_vllm_down_and_joins_the_loop_thread(tmp_path):
    fake = FakeAsyncLLM()
    engine = VllmSamplingEngine(LoopThread("vllm-engine-close"), fake, ModelInfo("fake", "dense", 1000, 64, 8))
    engine.add_base_adapter(tmp_path)
    asyncio.run(engine.generate(GenerateRequest(None, (1, 2), 1, GREEDY)))
    engine.close()
    engine.close()  # idempotent
    assert fake.shut_down
    assert not [t for t in threading.enumerate() if t.name == "vllm-engine-close"]
    with pytest.raises(UnavailableError) as closed:
        asyncio.run(engine.generate(GenerateRequest(None, (1, 2), 1, GREEDY)))
    assert closed.value.reason == "ENGINE_CLOSED"
