"""Makes tests/support (reference implementations shared by test suites) importable."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "support"))

from mesh_fixtures import mesh_ca_dir, model_data_dir, start_mesh  # noqa: E402,F401  (fixtures for every suite)
