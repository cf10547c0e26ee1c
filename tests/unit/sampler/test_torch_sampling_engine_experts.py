"""The torch sampling engine serving expert-LoRA adapters on tiny-moe (Qwen3-MoE, fused 3-D
experts) against HF PEFT (`target_parameters`): adapters saved by the trainer engine and by
PEFT itself, batched with an attention-only adapter and base-only rows."""

from __future__ import annotations

import asyncio
import json
import pathlib

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from tunemesh_common.lora import peft_format
from tunemesh.errors import InvalidArgumentError, NotFoundError
from tunemesh_sampler.domain import GenerateRequest, SamplingSpec

ATOL = 1e-4
NEW_TOKENS = 12
PROMPTS = {"ex": (5, 17, 200, 42, 9), "attn": (11, 12, 13, 14, 15, 16, 17, 18, 19), "peft-ex": (30, 31, 7),
           None: (100, 3, 88, 4)}


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> pathlib.Path:
    from tunemesh_common.models.tiny import build_moe

    directory = tmp_path_factory.mktemp("tiny-moe")
    build_moe(directory)
    return directory


def _base(moe_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()


def _trainer_adapters(moe_dir, root: pathlib.Path) -> dict[str, pathlib.Path]:
    """`ex` (attention + experts, r=4) and `attn` (attention only, r=8), with random non-zero
    B, written as the trainer writes checkpoints."""
    from tunemesh_trainer import checkpoint_files
    from tunemesh_trainer.domain import LoraSpec
    from tunemesh_trainer.engine import build_torch_engine

    trainer = build_torch_engine(moe_dir, "tiny-moe", "moe", max_lora_rank=8, max_seq_len=64)
    specs = {"ex": LoraSpec(rank=4, alpha=8, train_mlp=False, train_unembed=False, train_experts=True, seed=1),
             "attn": LoraSpec(rank=8, alpha=8, train_mlp=False, train_unembed=False, seed=2)}
    gen = torch.Generator().manual_seed(3)
    out = {}
    for key, spec in specs.items():
        trainer.create_adapter(key, spec)
        slot = trainer.adapter(key)
        weights = {n: torch.randn(t.shape, generator=gen) * 0.2 if ".lora_B." in n else t.clone()
                   for n, t in slot.weights().items()}
        slot.load_weights(weights)
        out[key] = root / key
        out[key].mkdir()
        for name, parts in checkpoint_files.encode(trainer.export_adapter(key, False), "tiny-moe").items():
            (out[key] / name).write_bytes(b"".join(bytes(p) for p in parts))
    return out


def _peft_expert_adapter(moe_dir, directory: pathlib.Path) -> pathlib.Path:
    """Expert LoRA alone (r=2), saved by PEFT itself."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    config = LoraConfig(r=2, lora_alpha=6, lora_dropout=0.0, target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    model = get_peft_model(_base(moe_dir), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def moe_adapter_dirs(moe_dir, tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("moe-adapters")
    return {**_trainer_adapters(moe_dir, root), "peft-ex": _peft_expert_adapter(moe_dir, root / "peft-ex")}


@pytest.fixture(scope="module")
def references(moe_dir, moe_adapter_dirs) -> dict:
    from peft import PeftModel

    models = {None: _base(moe_dir)}
    for key, directory in moe_adapter_dirs.items():
        models[key] = PeftModel.from_pretrained(_base(moe_dir), directory).eval()
    return models


@pytest.fixture(scope="module")
def moe_engine(moe_dir, moe_adapter_dirs):
    from tunemesh_sampler.engine import build_torch_engine

    engine = build_torch_engine(moe_dir, name="tiny-moe", family="moe", max_lora_rank=8, max_seq_len=64)
    for key, directory in moe_adapter_dirs.items():
        engine.load_adapter(key, directory)
    yield engine
    engine.close()


def _run(*coroutines):
    async def gather():
        return await asyncio.gather(*coroutines)

    return asyncio.run(gather())


def _reference_greedy(model, prompt, eos: tuple[int, ...]) -> tuple[list[int], list[float]]:
    """Greedy tokens (stopping after an end-of-sequence token) and their logprobs, each step
    a full forward of the sequence so far, unbatched, no cache."""
    tokens, logprobs = list(prompt), []
    with torch.no_grad():
        while len(logprobs) < NEW_TOKENS:
            logits = model(input_ids=torch.tensor([tokens])).logits[0, -1].float()
            token = int(logits.argmax())
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            if token in eos:
                break
    return tokens[len(prompt):], logprobs


def _reference_logprobs(model, tokens) -> np.ndarray:
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1).numpy()


def test_a_batch_mixing_expert_attention_and_base_rows_matches_peft(moe_engine, references):
    spec = SamplingSpec(max_tokens=NEW_TOKENS)
    before = moe_engine.batches_run
    results = _run(*(moe_engine.generate(GenerateRequest(key, prompt, 1, spec)) for key, prompt in PROMPTS.items()))
    assert moe_engine.batches_run == before + 1  # all four adapters' rows in one decode loop
    eos = moe_engine.info.eos_token_ids
    for (key, prompt), (sequence,) in zip(PROMPTS.items(), results):
        tokens, logprobs = _reference_greedy(references[key], prompt, eos)
        assert list(sequence.tokens) == tokens, key
        np.testing.assert_allclose(sequence.logprobs, logprobs, atol=ATOL, rtol=0, err_msg=str(key))


@pytest.mark.parametrize("key", ["ex", "attn", "peft-ex", None])
def test_prompt_logprobs_match_peft(moe_engine, references, key):
    tokens = (1, 200, 20, 33, 90, 4, 4, 61, 100, 2)
    got = _run(moe_engine.prompt_logprobs(key, tokens))[0]
    np.testing.assert_allclose(got, _reference_logprobs(references[key], tokens), atol=ATOL, rtol=0)


def test_the_expert_factors_matter(references):
    """Without this the comparisons above could pass with expert LoRA ignored."""
    tokens = (1, 200, 20, 33, 90, 4, 4, 61, 100, 2)
    base = _reference_logprobs(references[None], tokens)
    assert np.abs(_reference_logprobs(references["peft-ex"], tokens) - base).max() > 100 * ATOL
    assert np.abs(_reference_logprobs(references["ex"], tokens) - base).max() > 100 * ATOL


def _rewrite(source: pathlib.Path, target: pathlib.Path, config=None, weights=None) -> pathlib.Path:
    """A copy of an adapter directory with its config and / or tensors changed."""
    target.mkdir()
    raw = json.loads((source / peft_format.CONFIG_FILE).read_text())
    tensors = load_file(source / peft_format.WEIGHTS_FILE)
    (target / peft_format.CONFIG_FILE).write_text(json.dumps(config(raw) if config else raw))
    save_file(weights(tensors) if weights else tensors, target / peft_format.WEIGHTS_FILE)
    return target


def _two_experts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Expert factors cut to 2 of the model's 4 experts (A's first rows, B's matching columns)."""
    out = {}
    for key, array in tensors.items():
        if ".experts." in key and ".lora_A." in key:
            array = array[: array.shape[0] // 2]
        elif ".experts." in key:  # column j * experts + e: rank index j of expert e
            out_f, columns = array.shape
            array = array.reshape(out_f, columns // 4, 4)[:, :, :2].reshape(out_f, columns // 2)
        out[key] = np.ascontiguousarray(array)
    return out


@pytest.mark.parametrize("config, weights, reason", [
    pytest.param(None, _two_experts, "BAD_ADAPTER_WEIGHTS", id="fewer-experts-than-the-model"),
    pytest.param(lambda c: {**c, "target_parameters": None}, None, "BAD_ADAPTER_WEIGHTS", id="undeclared-experts"),
    pytest.param(lambda c: {**c, "target_parameters": ["experts.gate_up_proj"]}, None, "UNSUPPORTED_TARGET_PARAMETER",
                 id="one-expert-weight"),
    pytest.param(lambda c: {**c, "target_parameters": ["experts.gate_up_proj", "experts.down_proj", "router.weight"]},
                 None, "UNSUPPORTED_TARGET_PARAMETER", id="router"),
])
def test_load_refuses_expert_adapters_that_do_not_fit(moe_engine, moe_adapter_dirs, tmp_path, config, weights, reason):
    bad = _rewrite(moe_adapter_dirs["ex"], tmp_path / "bad", config, weights)
    with pytest.raises(InvalidArgumentError) as err:
        moe_engine.load_adapter("bad", bad)
    assert err.value.reason == reason
    assert not _holders(moe_engine, "bad")  # nothing half-loaded
    with pytest.raises(NotFoundError):
        _run(moe_engine.prompt_logprobs("bad", (1, 2, 3)))


def test_an_expert_adapter_does_not_load_on_a_dense_model(engine, moe_adapter_dirs):
    """`engine`: the sampler conftest's tiny-dense engine (same attention shapes as tiny-moe)."""
    with pytest.raises(InvalidArgumentError) as err:
        engine.load_adapter("moe-adapter", moe_adapter_dirs["ex"])
    assert err.value.reason == "UNSUPPORTED_TARGET_MODULE" and ".experts." in err.value.message


def _holders(engine, key: str) -> list[str]:
    """The LoRA targets (linears and expert weights) holding factors of `key`."""
    targets = engine._targets  # white-box: no other way to see that no factor is left behind
    found = [name for name, linear in targets.linears.items() if key in linear.pairs]
    return found + [f"{name}.{param}" for name, layer in targets.experts.items()
                    for param, pairs in layer.pairs.items() if key in pairs]


def test_unload_frees_the_expert_factors_and_the_rest_keep_serving(moe_engine, moe_adapter_dirs, references):
    moe_engine.load_adapter("again", moe_adapter_dirs["ex"])
    holders = _holders(moe_engine, "again")
    assert sum(".experts." in h for h in holders) == 4  # two MoE layers, two expert weights each
    moe_engine.unload_adapter("again")
    assert not _holders(moe_engine, "again")
    tokens = (7, 8, 9, 10, 11)
    got = _run(moe_engine.prompt_logprobs("ex", tokens))[0]
    np.testing.assert_allclose(got, _reference_logprobs(references["ex"], tokens), atol=ATOL, rtol=0)


def test_vllm_refuses_expert_adapters_and_auto_keeps_moe_on_torch(moe_dir, moe_adapter_dirs):
    from tunemesh_sampler.engine.vllm_engine import can_serve, check_adapter_config

    with pytest.raises(InvalidArgumentError) as err:
        check_adapter_config((moe_adapter_dirs["ex"] / peft_format.CONFIG_FILE).read_bytes(), 8)
    assert err.value.reason == "UNSUPPORTED_TARGET_PARAMETER" and "torch" in err.value.message
    assert check_adapter_config((moe_adapter_dirs["attn"] / peft_format.CONFIG_FILE).read_bytes(), 8).rank == 8
    assert can_serve(moe_dir, "moe")  # a reason not to: `auto` and `vllm` never take a MoE model to vLLM
