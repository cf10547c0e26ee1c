"""Renders deploy/k8s for the deploy tests (imported by them, not a conftest): default values and the GPU, multi-rank variant."""

from __future__ import annotations

import pathlib

from deploy import chart

REPO = pathlib.Path(__file__).resolve().parents[3]
CHART = REPO / "deploy" / "k8s"
API_KEYS = {"key-acme": "acme", "key-globex": "globex"}

# Each variant: values files merged over values.yaml, then --set assignments.
VARIANTS = {
    "default": ([], [f"apiKeys.keys.{k}={t}" for k, t in API_KEYS.items()]),
    "gpu": ([CHART / "values-gpu.yaml"], ["apiKeys.existingSecret=tenant-keys"]),
}


def render_variant(name: str, extra_sets: list[str] = (), chart_dir: pathlib.Path = CHART) -> list[dict]:
    files, sets = VARIANTS[name]
    values = chart.load_values(chart_dir, files, [*sets, *extra_sets])
    return chart.documents(chart.render(chart_dir, values, release="tm", namespace="mesh"))
