"""Tokenizer files from the service: content-addressed cache and local loading."""

from __future__ import annotations

import sys

import pytest

from tunemesh import tokenizer


def tokenizer_json() -> bytes:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str().encode()


def test_files_land_in_a_directory_named_by_their_content(tmp_path):
    files = [("tokenizer.json", tokenizer_json()), ("tokenizer_config.json", b"{}")]
    first = tokenizer.materialize(files, tmp_path)
    assert first.name == tokenizer.content_hash(files) and len(first.name) == 64
    assert (first / "tokenizer_config.json").read_bytes() == b"{}"
    assert tokenizer.materialize(list(reversed(files)), tmp_path) == first
    other = tokenizer.materialize([("tokenizer.json", b"{}")], tmp_path)
    assert other != first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/b", "", ".."])
def test_unsafe_file_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError):
        tokenizer.materialize([(name, b"x")], tmp_path)


def test_no_files_is_an_error(tmp_path):
    with pytest.raises(ValueError):
        tokenizer.materialize([], tmp_path)


def test_loads_with_tokenizers_when_transformers_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    directory = tokenizer.materialize([("tokenizer.json", tokenizer_json())], tmp_path)
    assert tokenizer.load(directory).encode("a b c").ids == [1, 2, 0]


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEMESH_CACHE_DIR", str(tmp_path))
    assert tokenizer.default_cache_root() == tmp_path / "tokenizers"


@pytest.mark.slow
def test_loads_with_transformers_auto_tokenizer(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = tokenizer.materialize([("tokenizer.json", tokenizer_json())], tmp_path)
    loaded = tokenizer.load(directory)
    assert loaded.encode("a b", add_special_tokens=False) == [1, 2]
