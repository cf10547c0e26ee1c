"""Run Helm on the chart: `helm template` (rendered manifests) and `helm lint`, offline.

Helm is `$TUNEMESH_HELM`, else the `helm` beside the running Python (`make install` puts
it in `.venv/bin` with `scripts/install_helm.py`), else the one on PATH. Each call gets
scratch HELM_CACHE_HOME / HELM_CONFIG_HOME / HELM_DATA_HOME, so no user state is read.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence

import yaml

CHART = pathlib.Path(__file__).resolve().parent / "k8s"
HOMES = ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME")


class HelmError(RuntimeError):
    """Helm is missing or exited non-zero; the message carries its stderr."""


def find() -> str | None:
    """The helm executable to run, or None when there is none."""
    if explicit := os.environ.get("TUNEMESH_HELM"):
        return explicit
    beside = pathlib.Path(sys.executable).parent / "helm"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("helm")


def run(*args: str) -> str:
    """Helm's stdout for `helm ARGS...`; HelmError with its stderr when it fails."""
    helm = find()
    if helm is None:
        raise HelmError("helm not found: `make install` installs it (scripts/install_helm.py), or set TUNEMESH_HELM")
    with tempfile.TemporaryDirectory(prefix="tunemesh-helm-") as home:
        env = {**os.environ, **{name: os.path.join(home, name) for name in HOMES}}
        try:
            done = subprocess.run([helm, *args], capture_output=True, text=True, env=env, timeout=120)
        except (FileNotFoundError, PermissionError) as err:
            raise HelmError(f"cannot run helm at {helm}: {err}") from err
    if done.returncode != 0:
        # Helm logs each followed chart symlink at INFO level; the error is what is left
        # (`helm lint` reports on stdout, then says on stderr that the chart failed).
        errors = [line for line in done.stderr.splitlines() if not line.startswith("level=INFO")]
        raise HelmError("\n".join([f"helm {args[0]} failed:", *done.stdout.splitlines(), *errors]))
    return done.stdout


def _values(values: Sequence[os.PathLike | str], sets: Sequence[str]) -> list[str]:
    return [*(arg for path in values for arg in ("-f", str(path))), *(arg for item in sets for arg in ("--set", item))]


def template(chart: os.PathLike | str = CHART, values: Sequence[os.PathLike | str] = (), sets: Sequence[str] = (),
             release: str = "tunemesh", namespace: str = "default") -> str:
    """`helm template RELEASE CHART -n NAMESPACE -f ... --set ...`: the manifest stream."""
    return run("template", release, str(chart), "--namespace", namespace, *_values(values, sets))


def lint(chart: os.PathLike | str = CHART, values: Sequence[os.PathLike | str] = (), sets: Sequence[str] = (),
         namespace: str = "default") -> str:
    """`helm lint --strict CHART -f ... --set ...`: its report; HelmError when the chart fails."""
    return run("lint", "--strict", str(chart), "--namespace", namespace, *_values(values, sets))


def documents(manifest: str) -> list[dict]:
    """Every non-empty YAML document of a manifest stream."""
    return [doc for doc in yaml.safe_load_all(manifest) if doc]
