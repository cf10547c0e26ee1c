"""`tunemesh tokenizers sync` against a real mesh (the session's shared `observed_mesh`): the
served model's tokenizer and config.json land in a Hugging Face cache, from which the
official Tinker SDK's tokenizer loader and AutoTokenizer load it by name with
HF_HUB_OFFLINE=1, encoding as the model directory's own tokenizer does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunemesh_common.models import TINY_DENSE, ModelRegistry
from tunemesh_local import hub_cache

pytestmark = pytest.mark.e2e
KEY = "tml-demo-alice"  # a DEV_KEYS key of the tests' meshes
TEXTS = ["What is 12 + 30? The answer is 42.", "The old man reads the map every day."]
# A fresh interpreter: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when imported.
LOAD_BY_NAME = """
import json, sys
from transformers import AutoTokenizer
from tinker.lib.public_interfaces.sampling_client import _load_tokenizer_from_model_info
name, texts = sys.argv[1], json.loads(sys.argv[2])
tinker_side = _load_tokenizer_from_model_info(name, name)  # what get_tokenizer() does with tokenizer_id = base model
plain = AutoTokenizer.from_pretrained(name)
print(json.dumps({"tinker": [tinker_side.encode(t) for t in texts], "auto": [plain.encode(t) for t in texts]}))
"""


def tunemesh_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # TUNEMESH_CA_BUNDLE: the mesh's CA, set while it runs
    return subprocess.run([sys.executable, "-m", "tunemesh_local.cli", "tokenizers", "sync", *args],
                          env=env, capture_output=True, text=True, timeout=180)


def test_sync_writes_a_cache_the_tinker_loader_reads_offline(observed_mesh, model_data_dir: Path, tmp_path: Path):
    address = observed_mesh.mesh.scheduler_address
    hf_home = tmp_path / "hf"
    done = tunemesh_cli("--address", address, "--api-key", KEY, "--hf-home", str(hf_home))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{TINY_DENSE}: wrote revision" in done.stdout

    model_dir = ModelRegistry.default(model_data_dir).materialize(TINY_DENSE)  # the trainer's copy, built already
    repo = hf_home / "hub" / hub_cache.repo_folder(TINY_DENSE)
    snapshot = repo / "snapshots" / (repo / "refs" / "main").read_text()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (snapshot / name).read_bytes() == (model_dir / name).read_bytes(), name

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
    loaded = subprocess.run([sys.executable, "-c", LOAD_BY_NAME, TINY_DENSE, json.dumps(TEXTS)],
                            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    ids = json.loads(loaded.stdout.strip().splitlines()[-1])
    from transformers import AutoTokenizer

    expected = [AutoTokenizer.from_pretrained(str(model_dir)).encode(t) for t in TEXTS]
    assert ids == {"tinker": expected, "auto": expected} and all(expected)

    again = tunemesh_cli("--address", address, "--api-key", KEY, "--hf-home", str(hf_home))
    assert again.returncode == 0 and f"{TINY_DENSE}: already had revision" in again.stdout, again.stderr


def test_sync_with_a_bad_key_fails_with_the_reason(observed_mesh, tmp_path: Path):
    done = tunemesh_cli("--address", observed_mesh.mesh.scheduler_address, "--api-key", "tml-not-a-key",
                        "--hf-home", str(tmp_path / "hf"))
    assert done.returncode == 1
    assert "refused GetCapabilities: UNAUTHENTICATED" in done.stderr, done.stderr
    assert not (tmp_path / "hf").exists()
