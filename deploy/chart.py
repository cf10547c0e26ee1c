"""Render a Helm-style chart without Helm: `python -m deploy.chart deploy/k8s [-f values.yaml] [--set a.b=c]`.

Reads `Chart.yaml`, `values.yaml` (merged with each `-f` file, then each `--set`), renders
every `templates/*.yaml` (not `_*` files) with `deploy.gotemplate`, and prints the
documents as `helm template` does. `.Files.Glob` / `.Files.Get` read files under the
chart directory (symlinks followed).
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import re
import sys
from dataclasses import dataclass
from typing import Any

import yaml

from deploy import gotemplate


@dataclass(frozen=True)
class Files:
    """The chart's files, as templates see them through `.Files`."""

    root: pathlib.Path

    def Glob(self, pattern: str) -> dict[str, str]:  # noqa: N802 (Helm's name)
        return {p.relative_to(self.root).as_posix(): p.read_text() for p in sorted(self.root.glob(pattern)) if p.is_file()}

    def Get(self, path: str) -> str:  # noqa: N802 (Helm's name)
        return (self.root / path).read_text()


def merge(base: dict, override: dict) -> dict:
    """`override` deep-merged over `base` (maps merge, anything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(assignment: str) -> dict:
    """`a.b=c` as `{"a": {"b": c}}`, with `c` read as a YAML scalar (so `3` is a number)."""
    path, sep, raw = assignment.partition("=")
    if not sep or not path:
        raise ValueError(f"--set expects key.path=value, got {assignment!r}")
    value: Any = yaml.safe_load(raw) if raw else ""
    for key in reversed(path.split(".")):
        value = {key: value}
    return value


def load_values(chart_dir: pathlib.Path, value_files: list[pathlib.Path] = (), sets: list[str] = ()) -> dict:
    values = yaml.safe_load((chart_dir / "values.yaml").read_text()) or {}
    for path in value_files:
        values = merge(values, yaml.safe_load(pathlib.Path(path).read_text()) or {})
    for assignment in sets:
        values = merge(values, parse_set(assignment))
    return values


def render(chart_dir: pathlib.Path, values: dict, release: str = "tunemesh", namespace: str = "default") -> dict[str, str]:
    """Rendered text of each template, by its path relative to the chart."""
    meta = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
    data = {
        "Values": values,
        "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
        "Chart": {"Name": meta["name"], "Version": meta["version"], "AppVersion": meta.get("appVersion", "")},
        "Files": Files(chart_dir),
    }
    out = {}
    for path in sorted((chart_dir / "templates").glob("*.yaml")):
        if path.name.startswith("_"):
            continue
        name = path.relative_to(chart_dir).as_posix()
        try:
            out[name] = gotemplate.render(path.read_text(), data)
        except gotemplate.TemplateError as err:
            raise gotemplate.TemplateError(f"{name}: {err}") from err
    return out


def documents(rendered: dict[str, str]) -> list[dict]:
    """Every non-empty YAML document of the rendered templates."""
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def stream(rendered: dict[str, str], chart_name: str) -> str:
    """The output of `helm template`: each non-empty document after a `# Source:` line."""
    parts = []
    for name, text in rendered.items():
        for doc in re.split(r"(?m)^---[ \t]*$", text):
            if yaml.safe_load(doc):
                parts.append(f"---\n# Source: {chart_name}/{name}\n{doc.strip(chr(10))}\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chart", type=pathlib.Path, help="chart directory (deploy/k8s)")
    parser.add_argument("-f", "--values", type=pathlib.Path, action="append", default=[], help="values file to merge")
    parser.add_argument("--set", action="append", default=[], help="key.path=value to merge last")
    parser.add_argument("--name", default="tunemesh", help="release name")
    parser.add_argument("--namespace", default="default", help="release namespace")
    args = parser.parse_args(argv)
    values = load_values(args.chart, args.values, args.set)
    try:
        rendered = render(args.chart, values, args.name, args.namespace)
    except gotemplate.TemplateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    sys.stdout.write(stream(rendered, yaml.safe_load((args.chart / "Chart.yaml").read_text())["name"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
