"""tinker-cookbook's recipes, unmodified, against a real mesh through the gateway (the
session's `gateway_mesh` and `gateway`), each in its own process, as a user runs them:
TINKER_BASE_URL and TINKER_API_KEY, and tiny-dense's tokenizer loaded by name from a
Hugging Face cache that `tunemesh tokenizers sync` wrote, with the hub offline.

Supervised learning runs `supervised.train.main` from a dozen lines (its `sl_basic` CLI
needs the hub for its data and a known model name); RL runs the `math_rl` CLI."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from gateway_process import MODEL, Gateway

tinker = pytest.importorskip("tinker")
pytest.importorskip("tinker_cookbook")

pytestmark = pytest.mark.e2e

KEY = "tml-demo-bob"  # a DEV_KEYS key of the tests' meshes
RECIPE_TIMEOUT = 240
# The cookbook's supervised loop, on a JSONL file of chats (default: its shipped example).
SL_HARNESS = """
import asyncio, json, sys
from pathlib import Path
import tinker_cookbook
from tinker_cookbook.supervised import train
from tinker_cookbook.supervised.data import FromConversationFileBuilder
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig
a = json.loads(sys.argv[1])
common = ChatDatasetBuilderCommonConfig(model_name_for_tokenizer=a["model"], renderer_name="role_colon", max_length=512,
                                        batch_size=a["batch"])
chats = a.get("file") or str(Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl")
data = FromConversationFileBuilder(file_path=chats, test_size=a["test_size"], common_config=common)
asyncio.run(train.main(train.Config(
    log_path=a["log_path"], model_name=a["model"], recipe_name="tunemesh_e2e", renderer_name="role_colon",
    dataset_builder=data, learning_rate=a["lr"], lora_rank=8, max_steps=a["steps"], num_epochs=a["epochs"],
    eval_every=a["every"], save_every=a["every"], base_url=a["base_url"])))
"""


@pytest.fixture(scope="module")
def hf_home(gateway_mesh, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face home holding the mesh's tokenizers (`tunemesh tokenizers sync`)."""
    home = tmp_path_factory.mktemp("hf")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # TUNEMESH_CA_BUNDLE: the mesh's CA, set while it runs
    done = subprocess.run([sys.executable, "-m", "tunemesh_local.cli", "tokenizers", "sync", "--address",
                           gateway_mesh.scheduler_address, "--api-key", KEY, "--hf-home", str(home)],
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return home


def run_recipe(gateway: Gateway, hf_home: Path, cwd: Path, *argv: str) -> None:
    """`python *argv` as a Tinker user runs it: offline hub, the gateway's URL and a tenant key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TINKER_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TINKER_BASE_URL=gateway.url, TINKER_API_KEY=KEY,
               TINKER_TELEMETRY="0", NO_PROXY="127.0.0.1,localhost", OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run([sys.executable, *argv], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=RECIPE_TIMEOUT)
    assert done.returncode == 0, f"{done.stderr[-6000:]}\n--- gateway log ---\n{gateway.log_tail(3000)}"


def supervised(gateway: Gateway, hf_home: Path, log_path: Path, **args) -> None:
    config = {"model": MODEL, "log_path": str(log_path), "base_url": gateway.url, "epochs": 1, **args}
    run_recipe(gateway, hf_home, log_path.parent, "-c", SL_HARNESS, json.dumps(config))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_supervised_recipe_lowers_the_loss_and_saves_tinker_checkpoints(gateway, hf_home, tmp_path, monkeypatch):
    log_path = tmp_path / "sl"
    # 112 training chats in batches of 16, 16 held out: NLL on them (sampled prompt logprobs) at steps 0 and 2
    supervised(gateway, hf_home, log_path, batch=16, test_size=16, lr=1e-2, steps=4, every=2)

    rows = jsonl(log_path / "metrics.jsonl")
    train_nll = [r["train_mean_nll"] for r in rows if "train_mean_nll" in r]
    assert len(train_nll) == 4 and all(math.isfinite(x) for x in train_nll), rows
    assert train_nll[-1] < train_nll[0] - 0.1, train_nll
    test_nll = {r["step"]: r["test/nll"] for r in rows if "test/nll" in r}
    assert sorted(test_nll) == [0, 2] and test_nll[2] < test_nll[0] - 0.05, test_nll

    saved = jsonl(log_path / "checkpoints.jsonl")
    assert [c["name"] for c in saved] == ["000002", "final"], saved
    model_id = saved[0]["state_path"].removeprefix("tinker://").partition("/")[0]
    for c in saved:
        assert c["state_path"] == f"tinker://{model_id}/weights/{c['name']}"
        assert c["sampler_path"] == f"tinker://{model_id}/sampler_weights/{c['name']}"
    # the paths name the mesh's checkpoints of that run
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    rest = tinker.RestClient(base_url=gateway.url, api_key=KEY)
    listed = {c.checkpoint_id for c in rest.list_checkpoints(model_id).result(timeout=60).checkpoints}
    assert {f"{kind}/{c['name']}" for c in saved for kind in ("weights", "sampler_weights")} <= listed
    info = rest.get_weights_info_by_tinker_path(saved[-1]["state_path"]).result(timeout=60)
    assert (info.base_model, info.lora_rank) == (MODEL, 8)


def arithmetic_chats(path: Path, n: int = 256) -> Path:
    """The math_rl arithmetic prompt (its few-shot prefix, then a sum) answered as role_colon renders it."""
    rng = random.Random(0)
    chats = []
    for _ in range(n):
        x, y = rng.randint(0, 100), rng.randint(0, 100)
        chats.append({"messages": [
            {"role": "user", "content": "What is 4 + 5?"}, {"role": "assistant", "content": "9"},
            {"role": "user", "content": f"What is {x} + {y}?"}, {"role": "assistant", "content": str(x + y)}]})
    path.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    return path


def test_math_rl_recipe_keeps_the_stop_string_so_answers_are_well_formed(gateway, hf_home, tmp_path):
    # tiny-dense is untrained: it never writes role_colon's 6-token stop string "\n\nUser:" in 8 tokens by
    # chance, so the answer format is taught first (the supervised recipe) and RL starts from that state.
    # A response is well-formed only when the sampler kept the stop string in its output.
    taught = tmp_path / "taught"
    supervised(gateway, hf_home, taught, file=str(arithmetic_chats(tmp_path / "arithmetic.jsonl")),
               batch=16, test_size=0, lr=1e-2, steps=128, epochs=8, every=0)
    start = jsonl(taught / "checkpoints.jsonl")[-1]["state_path"]

    log_path = tmp_path / "rl"
    run_recipe(gateway, hf_home, tmp_path, "-m", "tinker_cookbook.recipes.math_rl.train",
               "env=arithmetic", f"model_name={MODEL}", "renderer_name=role_colon", "loss_fn=importance_sampling",
               "group_size=4", "groups_per_batch=2", "max_tokens=8", "max_steps=3", "eval_every=0", "save_every=2",
               "lora_rank=8", f"load_checkpoint_path={start}", "behavior_if_log_dir_exists=delete",
               f"base_url={gateway.url}", f"log_path={log_path}")

    steps = [r for r in jsonl(log_path / "metrics.jsonl") if "env/all/reward/total" in r]
    assert len(steps) == 3, steps
    for r in steps:
        assert math.isfinite(r["env/all/reward/total"]) and r["env/all/total_episodes"] == 8, r
        assert r["env/all/format"] > 0, r
        # the sampler's logprobs of its tokens, as the trainer scores them
        assert abs(r["optim/kl_sample_train_v1"]) < 1e-2, r
    saved = jsonl(log_path / "checkpoints.jsonl")
    assert [c["name"] for c in saved] == ["000002", "final"], saved
    assert all(c[k].startswith("tinker://") for c in saved for k in ("state_path", "sampler_path")), saved
