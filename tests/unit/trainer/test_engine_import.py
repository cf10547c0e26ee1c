"""Importing the engine package must not import torch (the factory does, lazily)."""

from __future__ import annotations

import subprocess
import sys


def test_engine_package_imports_without_torch():
    code = (
        "import sys, tunemesh_trainer.engine as e; "
        "assert callable(e.build_torch_engine); "
        "assert 'torch' not in sys.modules, 'torch imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
