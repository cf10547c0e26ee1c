"""`tunemesh_local.hub_cache`: the Hugging Face hub cache layout, written offline, and what
transformers loads from it by model name with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tunemesh_common.models import TINY_DENSE, ModelRegistry, tokenizer_files
from tunemesh_local import hub_cache
from tunemesh_scheduler.tokenizers import CONFIG_FILE, MINIMAL_CONFIG

TEXTS = ["What is 12 + 30? The answer is 42.", "the cat sees a book today.", "  héllo\tworld \u4e16\u754c <|im_end|>"]
CHAT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
# Runs in a fresh interpreter: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when imported.
LOAD_BY_NAME = """
import json, sys
from transformers import AutoTokenizer
name, texts, chat = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
tok = AutoTokenizer.from_pretrained(name)
print(json.dumps({"ids": [tok.encode(t) for t in texts],
                  "chat": tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)}))
"""
READ_HUB_CACHE = "from huggingface_hub import constants; print(constants.HF_HUB_CACHE)"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return ModelRegistry.default(tmp_path_factory.mktemp("data")).materialize(TINY_DENSE)


def files_of(model_dir: Path) -> dict[str, bytes]:
    return tokenizer_files(model_dir)  # what a trainer ships: tokenizer files + config.json


def run_load(hf_home: Path, name: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, "-c", LOAD_BY_NAME, name, json.dumps(TEXTS), json.dumps(CHAT)],
                          env=env, capture_output=True, text=True, timeout=300)


def load_by_name(hf_home: Path, name: str) -> dict:
    done = run_load(hf_home, name)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def reference(model_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return {"ids": [tok.encode(t) for t in TEXTS],
            "chat": tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)}


@pytest.mark.parametrize("config", ["the model's", "the scheduler's fallback"])
def test_transformers_loads_the_snapshot_by_name_offline_as_from_the_model_dir(model_dir, tmp_path, config):
    files = files_of(model_dir)
    assert CONFIG_FILE in files
    if config != "the model's":
        files[CONFIG_FILE] = MINIMAL_CONFIG
    hf_home = tmp_path / "hf"
    hub_cache.write_snapshot(hf_home / "hub", TINY_DENSE, files)
    loaded = load_by_name(hf_home, TINY_DENSE)
    expected = reference(model_dir)
    assert loaded == expected
    assert all(expected["ids"]) and "<|im_start|>assistant" in expected["chat"]


def test_without_config_json_the_load_by_name_fails(model_dir, tmp_path):
    """Why config.json is shipped: the hub path refuses a snapshot without one."""
    files = files_of(model_dir)
    del files[CONFIG_FILE]
    hub_cache.write_snapshot(tmp_path / "hf" / "hub", TINY_DENSE, files)
    done = run_load(tmp_path / "hf", TINY_DENSE)
    assert done.returncode != 0 and "OSError" in done.stderr


def test_layout_is_refs_main_naming_a_snapshot_of_the_files(tmp_path):
    files = {"tokenizer.json": b'{"a": 1}', "config.json": b"{}"}
    snap = hub_cache.write_snapshot(tmp_path, "org/some-model", files)
    repo = tmp_path / "models--org--some-model"
    assert (repo / "refs" / "main").read_text() == snap.revision
    assert len(snap.revision) == 40 and int(snap.revision, 16) >= 0
    assert snap.path == repo / "snapshots" / snap.revision
    assert {p.name: p.read_bytes() for p in snap.path.iterdir()} == files
    assert snap.files == ("config.json", "tokenizer.json") and snap.changed
    assert sorted(p.name for p in (repo / "snapshots").iterdir()) == [snap.revision]  # no staging left
    assert oct(snap.path.stat().st_mode & 0o777) == "0o755"


def test_writing_the_same_files_again_changes_nothing(tmp_path):
    files = {"tokenizer.json": b"x", "config.json": b"{}"}
    first = hub_cache.write_snapshot(tmp_path, "org/m", files)
    ref = tmp_path / "models--org--m" / "refs" / "main"
    before = (ref.stat().st_mtime_ns, first.path.stat().st_mtime_ns)
    again = hub_cache.write_snapshot(tmp_path, "org/m", dict(reversed(list(files.items()))))
    assert again.revision == first.revision and not again.changed
    assert (ref.stat().st_mtime_ns, first.path.stat().st_mtime_ns) == before


def test_new_files_make_a_new_revision_and_keep_the_old_snapshot(tmp_path):
    old = hub_cache.write_snapshot(tmp_path, "org/m", {"tokenizer.json": b"v1"})
    new = hub_cache.write_snapshot(tmp_path, "org/m", {"tokenizer.json": b"v2"})
    assert new.revision != old.revision and new.changed
    assert (tmp_path / "models--org--m" / "refs" / "main").read_text() == new.revision
    assert (old.path / "tokenizer.json").read_bytes() == b"v1"
    assert (new.path / "tokenizer.json").read_bytes() == b"v2"


def test_a_damaged_snapshot_or_ref_is_repaired(tmp_path):
    files = {"tokenizer.json": b"good", "config.json": b"{}"}
    snap = hub_cache.write_snapshot(tmp_path, "m", files)
    (snap.path / "tokenizer.json").write_bytes(b"trunc")
    (snap.path / "stray.tmp").write_bytes(b"")
    repaired = hub_cache.write_snapshot(tmp_path, "m", files)
    assert repaired.changed and {p.name: p.read_bytes() for p in snap.path.iterdir()} == files
    (tmp_path / "models--m" / "refs" / "main").write_text("0" * 40)
    assert hub_cache.write_snapshot(tmp_path, "m", files).changed
    assert (tmp_path / "models--m" / "refs" / "main").read_text() == snap.revision


def test_concurrent_writers_of_the_same_files_both_succeed(tmp_path):
    files = {f"f{i}.json": os.urandom(64) for i in range(20)}
    results, errors = [], []

    def write() -> None:
        try:
            results.append(hub_cache.write_snapshot(tmp_path, "org/m", files))
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len({r.revision for r in results}) == 1
    (snap,) = (tmp_path / "models--org--m" / "snapshots").iterdir()
    assert {p.name: p.read_bytes() for p in snap.iterdir()} == files


def test_a_reader_following_refs_main_always_sees_a_whole_snapshot(tmp_path):
    """While revisions are written one after another, a reader resolving refs/main as
    huggingface_hub does finds every file of the revision it names, never a part."""
    repo = tmp_path / "models--org--m"
    names = {f"f{i}.json" for i in range(30)}
    stop, seen, bad = threading.Event(), [], []

    def read() -> None:
        while not stop.is_set():
            try:
                revision = (repo / "refs" / "main").read_text()
            except FileNotFoundError:
                continue
            try:
                present = {p.name for p in (repo / "snapshots" / revision).iterdir()}
            except FileNotFoundError:
                present = set()
            seen.append(revision)
            if present != names:
                bad.append((revision, len(present)))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for version in range(40):
            hub_cache.write_snapshot(tmp_path, "org/m", {n: f"{n}{version}".encode() * 50 for n in names})
    finally:
        stop.set()
        reader.join()
    assert not bad and len(set(seen)) > 1


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "dir\\x"])
def test_file_names_that_are_not_plain_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="refusing file name"):
        hub_cache.write_snapshot(tmp_path / "hub", "org/m", {"tokenizer.json": b"x", name: b"y"})
    assert not (tmp_path / "hub").exists()


@pytest.mark.parametrize("model", ["a/b/c", "/abs/dir", "org/../x", "org--x/y", "org/na me", "", "x.git"])
def test_model_names_that_are_not_hub_ids_are_refused(tmp_path, model):
    with pytest.raises(ValueError, match="not a Hugging Face model id"):
        hub_cache.write_snapshot(tmp_path, model, {"tokenizer.json": b"x"})
    assert not any(tmp_path.iterdir())


def test_no_files_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no files"):
        hub_cache.write_snapshot(tmp_path, "org/m", {})


def test_hub_dir_is_where_huggingface_hub_looks(tmp_path):
    home = Path.home()
    assert hub_cache.hub_dir(tmp_path, {"HF_HOME": "/elsewhere"}) == tmp_path / "hub"
    assert hub_cache.hub_dir(None, {"HF_HUB_CACHE": "/c/hub", "HF_HOME": "/h"}) == Path("/c/hub")
    assert hub_cache.hub_dir(None, {"HUGGINGFACE_HUB_CACHE": "/legacy"}) == Path("/legacy")
    assert hub_cache.hub_dir(None, {"HF_HOME": "/h"}) == Path("/h/hub")
    assert hub_cache.hub_dir(None, {"XDG_CACHE_HOME": "/x"}) == Path("/x/huggingface/hub")
    assert hub_cache.hub_dir(None, {}) == home / ".cache" / "huggingface" / "hub"


def test_hub_dir_agrees_with_huggingface_hub(tmp_path):
    """The same answer as huggingface_hub.constants, read in a fresh interpreter."""
    cases = [{"HF_HOME": str(tmp_path / "h")}, {"HF_HUB_CACHE": str(tmp_path / "c")},
             {"XDG_CACHE_HOME": str(tmp_path / "x")}, {}]
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "XDG_CACHE_HOME"}
    for case in cases:
        done = subprocess.run([sys.executable, "-c", READ_HUB_CACHE], env={**base, **case},
                              capture_output=True, text=True, timeout=120, check=True)
        assert Path(done.stdout.strip()) == hub_cache.hub_dir(None, case), case
