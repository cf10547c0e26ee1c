"""Renders deploy/k8s with Helm for the deploy tests (imported by them, not a conftest): default values and the GPU,
multi-rank variant. Without a helm binary the tests using it skip; `make install` installs one."""

from __future__ import annotations

import pathlib

import pytest

from deploy import helm

REPO = pathlib.Path(__file__).resolve().parents[3]
CHART = REPO / "deploy" / "k8s"
KEYS_VALUES = pathlib.Path(__file__).with_name("api_keys_values.yaml")  # apiKeys.file: a hashed keys file

# Each variant: values files merged over values.yaml, then --set assignments.
VARIANTS = {
    "default": ([KEYS_VALUES], []),
    "gpu": ([CHART / "values-gpu.yaml"], ["apiKeys.existingSecret=tenant-keys"]),
}


def require_helm() -> None:
    """Skip the calling test when no helm binary is found."""
    if helm.find() is None:
        pytest.skip("helm not installed: `make install` puts it at .venv/bin/helm (scripts/install_helm.py)")


def manifest(name: str, extra_sets: list[str] = (), chart_dir: pathlib.Path = CHART, release: str = "tm") -> str:
    """`helm template` output for a variant (namespace `mesh`), with more --set assignments."""
    require_helm()
    files, sets = VARIANTS[name]
    return helm.template(chart_dir, files, [*sets, *extra_sets], release=release, namespace="mesh")


def render_variant(name: str, extra_sets: list[str] = (), chart_dir: pathlib.Path = CHART) -> list[dict]:
    return helm.documents(manifest(name, extra_sets, chart_dir))
