"""The SDK installs alone: `pip install ./sdk` into a fresh venv pulls no torch and no
service code, and that venv's client trains and samples on a real mesh.

Marked slow: it builds the SDK wheel and installs grpcio, grpcio-status, protobuf and numpy
from the package index into the new venv (about a minute)."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import textwrap
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVICE_PACKAGES = ("tunemesh_common", "tunemesh_scheduler", "tunemesh_trainer", "tunemesh_sampler",
                    "tunemesh_checkpoint", "tunemesh_local")

CLIENT = textwrap.dedent("""
    import importlib.util, json, sys
    import tunemesh
    address, packages = sys.argv[1], sys.argv[2].split(",")
    with tunemesh.ServiceClient(address, "tml-demo-alice") as service:
        run = service.create_lora_training_client("tunemesh/tiny-dense", rank=4, seed=7)
        datum = tunemesh.Datum(
            model_input=tunemesh.ModelInput.from_ints([5, 6, 7, 8]),
            loss_fn_inputs={"target_tokens": [6, 7, 8, 9], "weights": [1.0, 1.0, 1.0, 1.0]},
        )
        fb = run.forward_backward([datum], "cross_entropy").result(timeout=120)
        run.optim_step(tunemesh.AdamParams(learning_rate=1e-3)).result(timeout=120)
        sampler = run.save_weights_and_get_sampling_client("alone")
        params = tunemesh.SamplingParams(max_tokens=3, temperature=0.0)
        sample = sampler.sample(tunemesh.ModelInput.from_ints([5, 6]), 1, params).result(timeout=120)
    print(json.dumps({
        "loss": fb.metrics["loss:sum"],
        "tokens": list(sample.sequences[0].tokens),
        "found": sorted(p for p in packages + ["torch", "transformers"] if importlib.util.find_spec(p)),
        "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch",) + tuple(packages)),
        "sdk_file": tunemesh.__file__,
    }))
""")


@pytest.mark.slow
@pytest.mark.e2e
def test_the_sdk_installs_alone_and_trains_on_a_real_mesh(observed_mesh, tmp_path):
    sdk = tmp_path / "sdk"  # a copy: the build writes its egg-info next to the sources
    shutil.copytree(ROOT / "sdk", sdk, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(sdk)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    done = subprocess.run([str(python), "-c", CLIENT, observed_mesh.mesh.scheduler_address,
                           ",".join(SERVICE_PACKAGES)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)  # not the repository root: nothing importable from there
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["found"] == [] and report["loaded"] == []  # no torch, no transformers, no service code
    assert report["sdk_file"].startswith(str(env_dir))
    assert report["loss"] > 0 and len(report["tokens"]) == 3
