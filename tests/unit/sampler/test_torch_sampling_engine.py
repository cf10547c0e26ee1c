"""The torch sampling engine against HF / PEFT references on the tiny dense model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from tunemesh_common.lora import peft_format
from tunemesh.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from tunemesh_sampler.domain import GenerateRequest, SamplingSpec, StopReason

PROMPTS = {"a1": (5, 17, 300, 42, 9), "a2": (11, 12, 13, 14, 15, 16, 17, 18, 19), None: (700, 3, 88)}
SAMPLED = SamplingSpec(max_tokens=16, temperature=1.0, top_p=0.9, top_k=20, seed=7)


def _request(key, prompt, spec, num_samples=1) -> GenerateRequest:
    return GenerateRequest(adapter_key=key, prompt_tokens=tuple(prompt), num_samples=num_samples, spec=spec)


def _run(*coroutines):
    async def gather():
        return await asyncio.gather(*coroutines)

    return asyncio.run(gather())


def _hf_greedy(model, prompt, new_tokens) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def _hf_logprobs(model, tokens) -> np.ndarray:
    """logprob of tokens[i] given tokens[:i] under `model`, i >= 1."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1).numpy()


def _greedy_batch(engine, max_tokens=10, num_samples=1):
    spec = SamplingSpec(max_tokens=max_tokens)
    return dict(zip(PROMPTS, _run(*(engine.generate(_request(k, p, spec, num_samples)) for k, p in PROMPTS.items()))))


def test_greedy_batch_of_two_adapters_and_base_matches_hf(engine, reference_models):
    before = engine.batches_run
    results = _greedy_batch(engine, num_samples=2)
    assert engine.batches_run == before + 1  # the three calls shared one decode loop
    other_a1 = (*PROMPTS["a2"], 77)
    arrivals = [("a1", other_a1), (None, PROMPTS[None]), ("a2", PROMPTS["a2"]), ("a1", PROMPTS["a1"])]
    interleaved = _run(*(engine.generate(_request(k, p, SamplingSpec(max_tokens=10))) for k, p in arrivals))
    for (key, prompt), (sequence,) in zip(arrivals, interleaved):
        assert list(sequence.tokens) == _hf_greedy(reference_models[key], prompt, 10), key
    expected = {key: _hf_greedy(reference_models[key], prompt, 10) for key, prompt in PROMPTS.items()}
    assert expected["a1"] != _hf_greedy(reference_models[None], PROMPTS["a1"], 10)  # the adapters matter
    assert expected["a2"] != _hf_greedy(reference_models[None], PROMPTS["a2"], 10)
    for key, sequences in results.items():
        assert [list(s.tokens) for s in sequences] == [expected[key]] * 2, key


def test_reported_logprobs_are_the_models_raw_logprobs(engine, reference_models):
    for key, (sequence,) in _greedy_batch(engine).items():
        prompt = PROMPTS[key]
        reference = _hf_logprobs(reference_models[key], prompt + sequence.tokens)[len(prompt) - 1:]
        np.testing.assert_allclose(sequence.logprobs, reference, atol=1e-4)


@pytest.mark.parametrize("key", [None, "a1", "a2"])
def test_prompt_logprobs_match_peft_forward(engine, reference_models, key):
    tokens = (1, 500, 20, 33, 900, 4, 4, 61, 1000, 2)
    got = _run(engine.prompt_logprobs(key, tokens))[0]
    assert len(got) == len(tokens) - 1
    np.testing.assert_allclose(got, _hf_logprobs(reference_models[key], tokens), atol=1e-5)


def test_same_seed_same_samples_whatever_the_batch(engine):
    request = _request("a1", PROMPTS["a1"], SAMPLED, num_samples=3)
    (alone,) = _run(engine.generate(request))
    others = [_request("a2", PROMPTS["a2"], SAMPLED.__class__(max_tokens=20, temperature=0.7, seed=1)),
              _request(None, PROMPTS[None], SamplingSpec(max_tokens=4))]
    batched = _run(engine.generate(others[0]), engine.generate(request), engine.generate(others[1]))[1]
    assert [s.tokens for s in batched] == [s.tokens for s in alone]
    assert len({s.tokens for s in alone}) == 3  # the samples of one request differ
    (reseeded,) = _run(engine.generate(_request("a1", PROMPTS["a1"], SamplingSpec(**{**vars(SAMPLED), "seed": 8}))))
    assert reseeded[0].tokens != alone[0].tokens


def test_top_k_one_and_tiny_top_p_are_greedy(engine):
    greedy = _greedy_batch(engine)["a2"][0].tokens
    for spec in (SamplingSpec(max_tokens=10, temperature=1.0, top_k=1, seed=3),
                 SamplingSpec(max_tokens=10, temperature=1.0, top_p=1e-6, seed=3)):
        (sequences,) = _run(engine.generate(_request("a2", PROMPTS["a2"], spec)))
        assert sequences[0].tokens == greedy


def test_rows_beyond_the_batch_size_run_in_later_batches(model_dir, adapter_dirs, engine):
    from tunemesh_sampler.engine import build_torch_engine

    info = engine.info
    small = build_torch_engine(model_dir, "tiny", "dense", info.max_lora_rank, info.max_seq_len, max_batch_rows=2)
    try:
        small.load_adapter("a1", adapter_dirs["a1"])
        request = _request("a1", PROMPTS["a1"], SAMPLED, num_samples=5)
        (split,) = _run(small.generate(request))
        assert small.batches_run == 3
    finally:
        small.close()
    (whole,) = _run(engine.generate(request))
    assert [s.tokens for s in split] == [s.tokens for s in whole]


def test_length_and_stop_token_reasons(engine):
    (greedy,) = _greedy_batch(engine, max_tokens=12)["a1"]
    assert greedy.stop_reason is StopReason.LENGTH and len(greedy.tokens) == 12
    assert not set(greedy.tokens) & set(engine.info.eos_token_ids)
    stop_token = greedy.tokens[4]
    spec = SamplingSpec(max_tokens=12, stop_token_ids=(stop_token,))
    (stopped,) = _run(engine.generate(_request("a1", PROMPTS["a1"], spec)))
    cut = greedy.tokens.index(stop_token) + 1
    assert stopped[0].tokens == greedy.tokens[:cut]  # the stop token is kept
    assert stopped[0].logprobs == pytest.approx(greedy.logprobs[:cut], abs=1e-6)
    assert stopped[0].stop_reason is StopReason.STOP


def test_stop_string_is_cut_from_the_output(engine, model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    (greedy,) = _greedy_batch(engine, max_tokens=12)[None]
    text = tokenizer.decode(greedy.tokens)
    pieces = [tokenizer.decode([t]) for t in greedy.tokens[3:]]
    stop = next(piece for piece in pieces if piece.strip() and "\ufffd" not in piece)
    spec = SamplingSpec(max_tokens=12, stop=("never there", stop))
    (stopped,) = _run(engine.generate(_request(None, PROMPTS[None], spec)))
    out = stopped[0]
    assert out.stop_reason is StopReason.STOP
    assert stop not in tokenizer.decode(out.tokens) and stop in text
    assert out.tokens == greedy.tokens[: len(out.tokens)]
    assert stop in tokenizer.decode(greedy.tokens[: len(out.tokens) + 1])  # cut at the first hit
    assert len(out.logprobs) == len(out.tokens)


def test_eos_from_the_generation_config_stops_and_is_kept(engine, model_dir, tmp_path):
    import json
    import shutil

    from tunemesh_sampler.engine import build_torch_engine

    assert engine.info.eos_token_ids == (0,)  # the tiny model's config
    (greedy,) = _greedy_batch(engine, max_tokens=12)[None]
    eos = greedy.tokens[5]
    shutil.copytree(model_dir, tmp_path / "model")
    config_file = tmp_path / "model" / "generation_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "eos_token_id": [eos, 1]}))
    other = build_torch_engine(tmp_path / "model", "tiny", "dense", engine.info.max_lora_rank, 64)
    try:
        assert set(other.info.eos_token_ids) == {0, 1, eos}
        (stopped,) = _run(other.generate(_request(None, PROMPTS[None], SamplingSpec(max_tokens=12))))
    finally:
        other.close()
    cut = greedy.tokens.index(eos) + 1
    assert stopped[0].tokens == greedy.tokens[:cut] and stopped[0].stop_reason is StopReason.STOP


def _write_adapter(directory, rank, factors: dict[str, tuple[int, ...]]):
    """A synthetic PEFT adapter: module -> (in, out) shapes of its A / B factors."""
    rng = np.random.default_rng(0)
    directory.mkdir()
    tensors = {}
    for module, (fan_in, fan_out) in factors.items():
        tensors[peft_format.peft_key(f"{module}.lora_A.weight")] = rng.normal(size=(rank, fan_in)).astype("f4")
        tensors[peft_format.peft_key(f"{module}.lora_B.weight")] = rng.normal(size=(fan_out, rank)).astype("f4")
    import json

    config = peft_format.build_config("tiny", rank, 2.0 * rank, list(factors))
    (directory / peft_format.CONFIG_FILE).write_text(json.dumps(config))
    (directory / peft_format.WEIGHTS_FILE).write_bytes(b"".join(bytes(p) for p in peft_format.float32_file(tensors)))
    return directory


@pytest.mark.parametrize(
    "rank, factors, reason",
    [  # the engine takes ranks up to 8
        (9, {"model.layers.0.self_attn.q_proj": (64, 64)}, "BAD_LORA_RANK"),
        (4, {"model.embed_tokens": (1024, 64)}, "UNSUPPORTED_TARGET_MODULE"),
        (4, {"model.layers.0.self_attn.q_proj": (32, 64)}, "BAD_ADAPTER_WEIGHTS"),
        (4, {"model.layers.0.self_attn.k_proj": (64, 64)}, "BAD_ADAPTER_WEIGHTS"),  # k_proj: 64 -> 32
    ],
)
def test_load_rejects_adapters_that_do_not_fit(engine, tmp_path, rank, factors, reason):
    directory = _write_adapter(tmp_path / "adapter", rank, factors)
    with pytest.raises(InvalidArgumentError) as err:
        engine.load_adapter("bad", directory)
    assert err.value.reason == reason
    with pytest.raises(NotFoundError):
        _run(engine.generate(_request("bad", (1, 2), SamplingSpec(max_tokens=2))))


def test_unknown_unloaded_and_duplicate_keys(engine, adapter_dirs):
    with pytest.raises(NotFoundError):
        _run(engine.generate(_request("nope", (1, 2), SamplingSpec(max_tokens=2))))
    with pytest.raises(NotFoundError):
        _run(engine.prompt_logprobs("nope", (1, 2)))
    engine.load_adapter("a1-again", adapter_dirs["a1"])
    with pytest.raises(AlreadyExistsError):
        engine.load_adapter("a1-again", adapter_dirs["a1"])
    (loaded,) = _run(engine.generate(_request("a1-again", PROMPTS["a1"], SamplingSpec(max_tokens=10))))
    assert loaded[0].tokens == _greedy_batch(engine)["a1"][0].tokens
    engine.unload_adapter("a1-again")
    with pytest.raises(NotFoundError) as err:
        _run(engine.generate(_request("a1-again", (1, 2), SamplingSpec(max_tokens=2))))
    assert err.value.reason == "ADAPTER_NOT_LOADED"
    with pytest.raises(NotFoundError):
        engine.unload_adapter("a1-again")


def test_half_precision_adapter_loads_widened(engine, adapter_dirs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter_dirs["a1"], tmp_path / "half")
    weights = tmp_path / "half" / peft_format.WEIGHTS_FILE
    save_file({k: t.to(torch.float16) for k, t in load_file(weights).items()}, weights)
    tokens = (1, 500, 20, 33, 900, 4)
    engine.load_adapter("a1-half", tmp_path / "half")
    try:
        half, full, base = _run(*(engine.prompt_logprobs(k, tokens) for k in ("a1-half", "a1", None)))
    finally:
        engine.unload_adapter("a1-half")
    np.testing.assert_allclose(half, full, atol=2e-3)
    assert np.abs(np.subtract(half, base)).max() > 0.05


def test_prompt_plus_max_tokens_must_fit(engine):
    with pytest.raises(InvalidArgumentError) as err:
        _run(engine.generate(_request(None, (1,) * 100, SamplingSpec(max_tokens=engine.info.max_seq_len - 99))))
    assert err.value.reason == "PROMPT_TOO_LONG"
