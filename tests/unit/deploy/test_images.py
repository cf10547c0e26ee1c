"""scripts/build_images.py (`make images`, `make image-smoke`): it builds exactly the Dockerfile's
CPU targets, the images the chart runs by default, on the base the Dockerfile names; the slim
scheduler / checkpoint images and the gateway image hold every package those services import
(the gateway's: tinker's imports too, without torch); the host's Debian mirror and pip sources
reach the build. No image is built here (`make image-smoke` does)."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import json
import pathlib
import re
import socket
import subprocess
import sys
import textwrap

import pytest
import yaml
from chart_variants import CHART, REPO
from test_docker_images import DOCKERFILE, ancestry, copy_sources, entrypoint, stages

CONTROL_REQUIREMENTS = REPO / "deploy" / "docker" / "requirements-control.txt"
GATEWAY_REQUIREMENTS = REPO / "deploy" / "docker" / "requirements-gateway.txt"
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


# ---- the gateway image -------------------------------------------------------------------------

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


def _pip_installs(stage: dict) -> list[list[str]]:
    """The words of each `pip install` command of a stage's RUN steps."""
    commands = (command.split() for run in stage["run"] for command in run.split("&&"))
    return [words for words in commands if words[:2] == ["pip", "install"]]


def _no_deps_packages(words: list[str]) -> set[str]:
    """What a `pip install --no-deps` command names, option values and paths (the project) aside."""
    if "--no-deps" not in words:
        return set()
    names, options = set(), ("-c", "-r", "--constraint", "--requirement")
    for before, word in zip(words[1:], words[2:]):
        if before not in options and not word.startswith(("-", "/")):
            names.add(_canonical(word.partition("==")[0]))
    return names


def image_packages(target: str) -> tuple[set[str], set[str]]:
    """(what the requirements files installed by `target`'s stages name, what they install
    with --no-deps), read from the Dockerfile: the first are installed with their
    dependencies, the second without."""
    all_stages = stages()
    chain = [all_stages[s] for s in ancestry(target, all_stages)]
    copied = {src.rsplit("/", 1)[-1]: REPO / src for stage in chain for src in copy_sources(stage)}
    named, bare = set(), set()
    for stage in chain:
        for words in _pip_installs(stage):
            bare |= _no_deps_packages(words)
            for before, word in zip(words, words[1:]):
                if before == "-r":
                    named |= set(_requirements(copied[word.rsplit("/", 1)[-1]].read_text()))
    return named, bare


def gateway_target() -> str:
    return yaml.safe_load((CHART / "values.yaml").read_text())["gateway"]["image"]


def test_the_gateway_image_is_its_own_and_slim():
    target, all_stages = gateway_target(), stages()
    assert entrypoint(target, all_stages) == ["python", "-m", "tunemesh_gateway"]
    assert not {"cpu-base", "gpu-base", "control-base"} & set(ancestry(target, all_stages))
    named, bare = image_packages(target)
    assert _canonical("aetcd") in named and _canonical("fastapi") in named  # control's file and its own
    assert bare == {"tinker"}  # installed without its declared transformers, at requirements.txt's pin:
    [install] = [w for s in ancestry(target, all_stages) for w in _pip_installs(all_stages[s]) if _no_deps_packages(w)]
    assert "-c /src/requirements.txt" in " ".join(install)
    assert _requirements((REPO / "requirements.txt").read_text())["tinker"]
    heavy = (_with_platform_dependencies(named) | bare) & ML_STACK
    assert not heavy, f"the gateway image would install the ML stack: {sorted(heavy)}"


def test_the_gateway_image_holds_every_package_the_gateway_imports():
    """Every third-party import of the gateway's code (eager or lazy), by distribution."""
    imports = third_party_imports(["tunemesh_gateway.__main__"])
    assert {"fastapi", "uvicorn", "tinker", "aetcd"} <= {m.partition(".")[0] for m in imports}
    heavy = {m: sorted(by) for m, by in imports.items() if m.partition(".")[0] in ML_STACK}
    assert not heavy, f"the gateway imports the ML stack (lazily or not): {heavy}"
    named, bare = image_packages(gateway_target())
    installed = _with_platform_dependencies(named) | bare
    missing = {m: sorted(by) for m, by in imports.items() if _distribution(m) not in installed}
    assert not missing, f"add their distributions to {GATEWAY_REQUIREMENTS.relative_to(REPO)}: {missing}"


# Imports every module of tunemesh_gateway with every installed distribution outside
# sys.argv[1] (a JSON list) refused, as in an image holding only those; prints the ML
# stack's modules that got loaded anyway.
REFUSING_IMPORT = textwrap.dedent("""
    import importlib, importlib.abc, importlib.metadata, json, pkgutil, re, sys

    image = set(json.loads(sys.argv[1]))
    owners = importlib.metadata.packages_distributions()

    class NotInTheImage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            shipped_by = {re.sub(r"[-_.]+", "-", d).lower() for d in owners.get(name.partition(".")[0], [])}
            if shipped_by and not shipped_by & image:
                raise ModuleNotFoundError(f"No module named {name!r} (not in the image)", name=name)
            return None

    sys.meta_path.insert(0, NotInTheImage())
    import tunemesh_gateway
    for module in pkgutil.walk_packages(tunemesh_gateway.__path__, "tunemesh_gateway."):
        importlib.import_module(module.name)
    print(json.dumps(sorted(m for m in sys.modules if m.partition(".")[0] in sys.argv[2:])))
""")


def test_the_gateway_imports_with_only_its_image_s_packages():
    """tinker is installed without its dependencies: importing tinker.types and tinker.proto
    (its package's __init__ imports its client) must need only what the image lists, and take
    no torch (tinker imports it only where it is installed; here it is refused)."""
    named, bare = image_packages(gateway_target())
    image = _with_platform_dependencies(named) | bare | {"tunemesh"}
    done = subprocess.run([sys.executable, "-c", REFUSING_IMPORT, json.dumps(sorted(image)), *sorted(ML_STACK)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, f"add to {GATEWAY_REQUIREMENTS.relative_to(REPO)}: {done.stderr[-2000:]}"
    assert json.loads(done.stdout) == []


@pytest.mark.parametrize("path", [CONTROL_REQUIREMENTS, GATEWAY_REQUIREMENTS], ids=lambda p: p.name)
def test_each_image_requirement_is_pinned_in_exactly_one_place(path):
    pinned = {n: v for n, v in _requirements((REPO / "requirements.txt").read_text()).items() if v}
    for name, version in _requirements(path.read_text()).items():
        assert (name in pinned) != (version is not None), (
            f"{name}: pin it in requirements.txt or in {path.name}, not both or neither")


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


def test_probe_asks_an_http_service_behind_its_upstream():
    """The gateway's smoke test in miniature: its /healthz is 200 once its scheduler address
    answers grpc.health.v1, which the checkpoint service here does as well (no etcd needed)."""
    done = subprocess.run([sys.executable, PROBE, "--timeout", "60", "--upstream",
                           "tunemesh_checkpoint --root-dir {work}/store --insecure true", "--http", "/healthz",
                           "tunemesh_gateway", "--scheduler", "{upstream}", "--insecure", "true"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tunemesh_checkpoint at 127.0.0.1:" in done.stdout and "/healthz: 200 OK" in done.stdout


def test_probe_fails_when_the_http_service_is_not_ready():
    """Nothing listens at the gateway's scheduler address: /healthz stays 503 and the probe says so."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"
    done = subprocess.run([sys.executable, PROBE, "--timeout", "5", "--http", "/healthz", "tunemesh_gateway",
                           "--scheduler", address, "--insecure", "true"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "503 Service Unavailable" in done.stdout and "not serving" in done.stderr
