"""The gateway keeps the repository's import rules (tests/unit/test_import_graph.py, whose
walker this reuses): it takes only the wire layer from the SDK package, imports no other
service, and its core imports neither grpc nor the web stack."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[3]
GATEWAY = ROOT / "services" / "gateway" / "tunemesh_gateway"
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tests" / "unit" / "test_import_graph.py")
graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(graph)

SOURCES = sorted(GATEWAY.rglob("*.py"))
WEB = ("grpc", "fastapi", "starlette", "uvicorn", "httpx")


def test_the_walk_sees_the_gateway():
    assert any(p.name == "app.py" for p in SOURCES) and "fastapi" in graph.imports(GATEWAY / "app.py")


def test_the_gateway_takes_only_the_wire_layer_from_the_sdk_package():
    wrong = {(p.name, m) for p in SOURCES for m in graph.imports(p)
             if graph._top(m) == "tunemesh" and not (graph._in_wire(m) or m == "tunemesh")}
    assert not wrong


def test_the_gateway_imports_no_other_service_and_no_internal_contract():
    wrong = {(p.name, m) for p in SOURCES for m in graph.imports(p)
             if graph._top(m) in (graph.SERVICES - {"tunemesh_gateway"}) | {"tunemesh_local", "tunemesh_internal"}}
    assert not wrong


def test_the_gateway_core_imports_neither_grpc_nor_the_web_stack():
    wrong = {(p.name, m) for p in (GATEWAY / "core").glob("*.py") for m in graph.imports(p) if graph._top(m) in WEB}
    assert not wrong


def test_convert_and_status_are_pure():
    for name in ("convert.py", "status.py"):
        assert not {m for m in graph.imports(GATEWAY / name) if graph._top(m) in (*WEB, "asyncio", "socket")}
