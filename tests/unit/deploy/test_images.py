"""scripts/build_images.py (`make images`, `make image-smoke`): it builds exactly the Dockerfile's
CPU targets, the images the chart runs by default, on the base the Dockerfile names; the slim
scheduler / checkpoint images hold every package those services import; the host's Debian
mirror and pip sources reach the build. No image is built here (`make image-smoke` does)."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest
import yaml
from chart_variants import CHART, REPO
from test_docker_images import DOCKERFILE, ancestry, entrypoint, stages

CONTROL_REQUIREMENTS = REPO / "deploy" / "docker" / "requirements-control.txt"
ML_STACK = {"torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "vllm", "deepspeed"}


def _load_build_images():
    spec = importlib.util.spec_from_file_location("build_images", REPO / "scripts" / "build_images.py")
    module = sys.modules["build_images"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


build_images = _load_build_images()


def service_targets() -> dict[str, list[str]]:
    """Each target with an entrypoint: its stage ancestry."""
    all_stages = stages()
    return {name: ancestry(name, all_stages) for name in all_stages if all_stages[name]["entrypoint"]}


def test_the_script_builds_every_cpu_target_and_no_gpu_one():
    targets = service_targets()
    assert set(build_images.CPU_TARGETS) == {t for t, chain in targets.items() if "gpu-base" not in chain}
    assert set(build_images.GPU_TARGETS) == {t for t, chain in targets.items() if "gpu-base" in chain}
    assert build_images.TORCH_TARGETS == {t for t, chain in targets.items() if "cpu-base" in chain}
    for target, smoke in build_images.CPU_TARGETS.items():
        assert entrypoint(target, stages())[2] == smoke.module  # the probe starts the image's own service


def test_the_charts_default_images_are_all_built_here():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    images = {values[component]["image"] for component in ("scheduler", "trainer", "sampler", "checkpoint", "gateway")}
    assert images <= set(build_images.CPU_TARGETS)
    assert build_images.chart_tag() == values["images"]["tag"]


def test_the_base_is_tagged_as_the_dockerfiles_from():
    [default] = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert default == f"{build_images.BASE_NAME}:{build_images.SUITE}"
    assert stages()["python-base"]["base"] == "${PYTHON_IMAGE}"


# ---- the control images (scheduler, checkpoint) -------------------------------------------------

def _requirements(text: str) -> dict[str, str | None]:
    """Canonical name -> pinned version (None when unpinned) of a requirements file's lines."""
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, _, version = line.partition("==")
            out[_canonical(name)] = version.strip() or None
    return out


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _imports(path, package: str):
    """(module, imported names) of every import in a file, outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            yield from ((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            yield base, [alias.name for alias in node.names]


def third_party_imports(roots: list[str]) -> dict[str, set[str]]:
    """Non-stdlib modules imported (at import time or lazily) by the project modules reachable
    from `roots` -> the project modules importing each."""
    seen, found, todo = set(), {}, list(roots)
    while todo:
        module = todo.pop()
        spec = importlib.util.find_spec(module) if module not in seen else None
        seen.add(module)
        if spec is None or not (spec.origin or "").startswith(str(REPO)):
            continue
        package = module if spec.submodule_search_locations else module.rpartition(".")[0]
        for base, names in _imports(pathlib.Path(spec.origin), package):
            top = base.partition(".")[0]
            if top.startswith("tunemesh"):
                todo += [base, *(f"{base}.{n}" for n in names if _is_module(f"{base}.{n}"))]
            elif top not in sys.stdlib_module_names and top != "__future__":
                found.setdefault(base, set()).add(module)
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def _top_level_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distribution(module: str) -> str:
    """The installed distribution shipping `module` (google.rpc vs google.protobuf: by path)."""
    candidates = _top_level_distributions().get(module.partition(".")[0], [])
    if len(candidates) > 1:
        prefix = "/".join(module.split(".")[:2])
        candidates = [d for d in candidates if any(str(f).startswith(prefix) for f in importlib.metadata.files(d) or [])]
    assert candidates, f"{module} is imported but no installed distribution ships it"
    return _canonical(candidates[0])


def _with_dependencies(names) -> set[str]:
    todo, out = list(names), set()
    while todo:
        name = _canonical(todo.pop())
        if name in out:
            continue
        out.add(name)
        for requirement in importlib.metadata.requires(name) or []:
            if "extra ==" not in requirement:
                todo.append(re.match(r"[A-Za-z0-9._-]+", requirement).group())
    return out


JOB_ROOTS = ["tunemesh_common.membership.etcd_auth"]  # the chart's etcd-auth Job runs in the scheduler image


def control_roots() -> list[str]:
    all_stages = stages()
    return [entrypoint(t, all_stages)[2] + ".__main__" for t, chain in service_targets().items() if "control-base" in chain]


def test_control_images_are_the_scheduler_and_checkpoint():
    assert sorted(control_roots()) == ["tunemesh_checkpoint.__main__", "tunemesh_scheduler.__main__"]


def test_control_images_hold_every_package_their_services_import():
    imports = third_party_imports(control_roots() + JOB_ROOTS)
    assert "grpc" in imports and "aetcd" in imports  # the walk reaches tunemesh_common's modules
    heavy = {m: sorted(by) for m, by in imports.items() if m.partition(".")[0] in ML_STACK}
    assert not heavy, f"the scheduler / checkpoint import the ML stack (lazily or not): {heavy}"
    installed = _with_dependencies(_requirements(CONTROL_REQUIREMENTS.read_text()))
    missing = {m: sorted(by) for m, by in imports.items() if _distribution(m) not in installed}
    assert not missing, f"add their distributions to {CONTROL_REQUIREMENTS.relative_to(REPO)}: {missing}"


def test_the_gateway_s_image_holds_every_package_the_gateway_imports():
    """The chart runs `python -m tunemesh_gateway` in an image built on requirements.txt (no
    gateway target of its own): that must cover fastapi, uvicorn, tinker and the rest."""
    image = yaml.safe_load((CHART / "values.yaml").read_text())["gateway"]["image"]
    assert "cpu-base" in ancestry(image, stages()) and image in build_images.CPU_TARGETS
    assert any("requirements.txt" in run for run in stages()["cpu-base"]["run"])
    imports = third_party_imports(["tunemesh_gateway.__main__"])
    assert {"fastapi", "uvicorn", "tinker", "aetcd"} <= {m.partition(".")[0] for m in imports}
    installed = _with_platform_dependencies(_requirements((REPO / "requirements.txt").read_text()))
    missing = {m: sorted(by) for m, by in imports.items() if _distribution(m) not in installed}
    assert not missing, f"add their distributions to requirements.txt: {missing}"


def _with_platform_dependencies(names) -> set[str]:
    """`names` and what they require on this platform (environment markers evaluated, no extras)."""
    from packaging.requirements import Requirement

    todo, out = list(names), set()
    while todo:
        name = _canonical(todo.pop())
        if name in out:
            continue
        out.add(name)
        for text in importlib.metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return out


def test_each_control_requirement_is_pinned_in_exactly_one_place():
    pinned = {n: v for n, v in _requirements((REPO / "requirements.txt").read_text()).items() if v}
    for name, version in _requirements(CONTROL_REQUIREMENTS.read_text()).items():
        assert (name in pinned) != (version is not None), (
            f"{name}: pin it in requirements.txt or in requirements-control.txt, not both or neither")


# ---- the host's Debian mirror and pip sources ----------------------------------------------------

def test_apt_sources_one_line_and_deb822(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [arch=amd64] http://mirror.example/debian-security bookworm-security main\n"
        "deb https://packages.example/apt cloud-sdk-bookworm main\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb deb-src\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main contrib\n\nTypes: deb\nURIs: http://other.example/debian\nSuites: bookworm\nEnabled: no\n")
    assert build_images.debian_sources(tmp_path) == [
        "deb http://mirror.example/debian bookworm main contrib",
        "deb http://mirror.example/debian bookworm-updates main contrib",
        "deb http://mirror.example/debian-security bookworm-security main",
    ]
    assert build_images.debian_sources(tmp_path, mirror="http://m/debian") == ["deb http://m/debian bookworm main"]
    (tmp_path / "sources.list.d" / "debian.sources").unlink()
    with pytest.raises(SystemExit, match="--mirror"):
        build_images.debian_sources(tmp_path)  # only -security left: nothing to debootstrap from


def test_base_key_follows_the_recipe():
    sources = ["deb http://a/debian bookworm main"]
    assert build_images.base_key(sources) == build_images.base_key(list(sources))
    assert build_images.base_key(sources) != build_images.base_key(["deb http://b/debian bookworm main"])


def test_host_pip_sources_are_mounted_read_only_under_run_host(tmp_path):
    wheels, index = tmp_path / "wheels", tmp_path / "pypi" / "simple"
    wheels.mkdir()
    index.mkdir(parents=True)
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nextra-index-url = file://{index} https://remote.example/simple\ntimeout = 60\n")
    settings = build_images.host_pip_settings({"PIP_CONFIG_FILE": str(conf), "PIP_FIND_LINKS": str(wheels),
                                               "PIP_CERT": "/etc/ssl/my.pem"})
    assert settings["cert"] == "/etc/ssl/my.pem" and settings["default-timeout"] == "60"
    args, mounts = build_images.pip_build_args(settings)
    assert f"PIP_EXTRA_INDEX_URL=file:///run/host{index} https://remote.example/simple" in args
    assert f"PIP_FIND_LINKS=/run/host{wheels}" in args and "PIP_DEFAULT_TIMEOUT=60" in args
    # the index's parent: its pages link to ../../files/
    assert mounts == sorted([f"-v={index.parent}:/run/host{index.parent}:ro", f"-v={wheels}:/run/host{wheels}:ro"])
    assert not any("PIP_CERT" in a for a in args)  # the CA bundle is mounted by build_args, never a setting


# ---- the smoke probe -----------------------------------------------------------------------------

PROBE = REPO / "deploy" / "docker" / "probe.py"


def test_probe_sees_a_serving_checkpoint_service():
    done = subprocess.run([sys.executable, PROBE, "--timeout", "60", "tunemesh_checkpoint", "--root-dir", "{work}/store",
                           "--insecure", "true"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SERVING" in done.stdout


def test_probe_fails_when_the_service_does_not_start():
    done = subprocess.run([sys.executable, PROBE, "--timeout", "60", "tunemesh_checkpoint", "--no-such-flag"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "exited with" in done.stderr
