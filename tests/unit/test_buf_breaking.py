"""`buf breaking` against protos/baseline.binpb (run by `make test`) passes on the tree
and catches a wire break: a field renumbered in a copy of the protos fails it."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUF = pathlib.Path(sys.executable).parent / "buf"

pytestmark = pytest.mark.skipif(not BUF.exists(), reason="buf is installed by `make install` (requirements-dev)")


def _breaking(workdir: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BUF), "breaking", "--against", str(ROOT / "protos" / "baseline.binpb")],
                          cwd=workdir, capture_output=True, text=True, timeout=120)


def test_the_protos_keep_the_baselines_wire_contract():
    done = _breaking(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_renumbered_field_breaks_it(tmp_path):
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("*.binpb"))
    training = tmp_path / "protos" / "tunemesh" / "v1" / "training.proto"
    text = training.read_text()
    assert "  string session = 2;" in text
    training.write_text(text.replace("  string session = 2;", "  string session = 99;", 1))
    done = _breaking(tmp_path)
    assert done.returncode != 0 and "session" in done.stdout + done.stderr
