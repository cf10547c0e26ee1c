"""Who may import whom, read from the source (every import statement, at any depth).

- No service imports another service; all of them may use `tunemesh_common`.
- The SDK (`tunemesh`) imports no service code.
- Services take only the wire layer from the SDK package: the public stubs (`tunemesh.v1`),
  the one error model and its rich-status form (`tunemesh.errors`) and the tensor codec
  (`tunemesh.tensors`); the service-to-service stubs live in the server-side
  `tunemesh_internal`, which the SDK never imports. `tunemesh_local`, the command line, is an
  SDK client.
- The scheduler core imports neither grpc nor torch, and its deciding modules (the
  machine and what it is made of) not even asyncio: they take time and answers as inputs.
- The trainer's engine is compute: it starts no process and keeps no clock (rank groups
  are spawned and watched by `tunemesh_trainer.ranks`).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = {
    "tunemesh": ROOT / "sdk" / "tunemesh",
    "tunemesh_common": ROOT / "services" / "common" / "tunemesh_common",
    "tunemesh_checkpoint": ROOT / "services" / "checkpoint" / "tunemesh_checkpoint",
    "tunemesh_sampler": ROOT / "services" / "sampler" / "tunemesh_sampler",
    "tunemesh_scheduler": ROOT / "services" / "scheduler" / "tunemesh_scheduler",
    "tunemesh_trainer": ROOT / "services" / "trainer" / "tunemesh_trainer",
    "tunemesh_local": ROOT / "services" / "local" / "tunemesh_local",
    "tunemesh_gateway": ROOT / "services" / "gateway" / "tunemesh_gateway",
}
SERVICES = {"tunemesh_checkpoint", "tunemesh_sampler", "tunemesh_scheduler", "tunemesh_trainer", "tunemesh_gateway"}
WIRE = ("tunemesh.v1", "tunemesh.errors", "tunemesh.tensors")  # the SDK's wire layer
INTERNAL = ROOT / "services" / "common" / "tunemesh_internal"
CORE = PACKAGES["tunemesh_scheduler"] / "core"
TRAINER_ENGINE = PACKAGES["tunemesh_trainer"] / "engine"
PROCESS_AND_CLOCK = ("subprocess", "multiprocessing", "signal", "atexit", "socket", "time", "sched", "datetime")
PURE = ("machine.py", "actions.py", "snapshots.py", "sequencing.py", "fairness.py", "recovery.py", "idempotency.py",
        "records.py", "sessions.py")


def imports(path: pathlib.Path) -> set[str]:
    """Every absolute module name `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def sources(package: str) -> list[pathlib.Path]:
    return [p for p in PACKAGES[package].rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))]


def _top(module: str) -> str:
    return module.split(".")[0]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_package_imports_a_service_other_than_itself(package):
    wrong = {(p.relative_to(ROOT).as_posix(), m) for p in sources(package) for m in imports(p)
             if _top(m) in SERVICES and _top(m) != package}
    assert not wrong


@pytest.mark.parametrize("package", sorted(SERVICES | {"tunemesh_common"}))
def test_services_take_only_the_wire_layer_from_the_sdk_package(package):
    wrong = {(p.relative_to(ROOT).as_posix(), m) for p in sources(package) for m in imports(p)
             if _top(m) == "tunemesh" and not (_in_wire(m) or m == "tunemesh")}
    wrong |= {(p.relative_to(ROOT).as_posix(), f"tunemesh.{a.name}") for p in sources(package)
              for n in ast.walk(ast.parse(p.read_text()))
              if isinstance(n, ast.ImportFrom) and n.module == "tunemesh" and n.level == 0
              for a in n.names if not _in_wire(f"tunemesh.{a.name}")}
    assert not wrong


def _in_wire(module: str) -> bool:
    return any(module == wire or module.startswith(wire + ".") for wire in WIRE)


def test_the_wire_check_can_fail():
    assert _in_wire("tunemesh.v1.types_pb2") and _in_wire("tunemesh.errors.InvalidArgumentError")
    assert not _in_wire("tunemesh.client") and not _in_wire("tunemesh._wire") and not _in_wire("tunemesh.errorsx")


def test_the_sdk_does_not_ship_or_import_the_internal_contract():
    assert not (PACKAGES["tunemesh"] / "internal").exists()
    wrong = {(p.relative_to(ROOT).as_posix(), m) for p in PACKAGES["tunemesh"].rglob("*.py")
             for m in imports(p) if _top(m) == "tunemesh_internal"}
    assert not wrong


def test_the_internal_stubs_import_only_the_public_stubs_and_protobuf():
    found = {m for p in INTERNAL.rglob("*.py") for m in imports(p)}
    assert {m for m in found if m.startswith("tunemesh_internal.v1.")}  # the walk sees them
    wrong = {m for m in found if _top(m) not in ("tunemesh_internal", "google", "grpc", "warnings")
             and not m.startswith("tunemesh.v1")}
    assert not wrong


def test_the_scheduler_core_imports_neither_grpc_nor_torch():
    wrong = {(p.name, m) for p in CORE.glob("*.py") for m in imports(p) if _top(m) in ("grpc", "torch")}
    assert not wrong


def test_the_scheduler_machine_is_pure():
    wrong = {(name, m) for name in PURE for m in imports(CORE / name)
             if _top(m) in ("asyncio", "grpc", "torch", "time", "aetcd", "socket", "threading")}
    assert not wrong


def test_the_trainer_engine_spawns_no_process_and_keeps_no_clock():
    wrong = {(p.name, m) for p in TRAINER_ENGINE.rglob("*.py") for m in imports(p) if _top(m) in PROCESS_AND_CLOCK}
    assert not wrong


def test_the_walk_sees_imports_inside_functions(tmp_path):
    """The checks above can fail: an import inside a function is found."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from tunemesh_trainer.core import TrainerCore\n    import torch\n")
    assert {"tunemesh_trainer.core", "tunemesh_trainer.core.TrainerCore", "torch"} <= imports(module)


def test_the_internal_stubs_keep_their_wire_names():
    """Only the Python module path moved: services, RPC paths and the proto package did not."""
    from tunemesh_internal.v1 import trainer_pb2

    assert trainer_pb2.DESCRIPTOR.package == "tunemesh.internal.v1"
    assert trainer_pb2.TrainerNode.__module__ == "tunemesh_internal.v1.trainer_pb2"
    for grpc_module in INTERNAL.glob("v1/*_pb2_grpc.py"):
        text = grpc_module.read_text()
        assert "'tunemesh_internal.v1." not in text and "/tunemesh_internal." not in text, grpc_module.name


COMMON_LAYERS = {  # tunemesh_common subpackage -> the other subpackages it may import
    "service": {"membership", "security"},
    "checkpoints": {"service", "security"},
    "membership": {"security"},
    "lora": {"numerics"}, "numerics": set(), "training": set(), "models": set(), "security": set(),
}


def test_tunemesh_common_is_split_by_subject_and_layered():
    common = PACKAGES["tunemesh_common"]
    top_modules = sorted(p.name for p in common.glob("*.py") if p.name != "__init__.py")
    assert not top_modules  # every module lives in the subpackage of its subject
    assert {p.name for p in common.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(COMMON_LAYERS)
    wrong = set()
    for sub, allowed in COMMON_LAYERS.items():
        for path in (common / sub).rglob("*.py"):
            for m in imports(path):
                parts = m.split(".")
                if parts[0] == "tunemesh_common" and len(parts) > 1 and parts[1] not in (sub, *allowed):
                    wrong.add((path.relative_to(ROOT).as_posix(), m))
    assert not wrong


def test_each_service_keeps_its_own_metrics():
    """No service's metric set lives in tunemesh_common: each is in that service."""
    shared = (PACKAGES["tunemesh_common"] / "service" / "metrics.py").read_text()
    for service in SERVICES:
        assert (PACKAGES[service] / "metrics.py").exists(), service
    for name in ("SchedulerMetrics", "TrainerMetrics", "SamplerMetrics", "CheckpointMetrics"):
        assert f"class {name}" not in shared
