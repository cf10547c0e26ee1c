"""`import tunemesh as tinker`: tinker-cookbook's entry points import against tunemesh.

A subprocess makes `tinker` and every `tinker.*` module resolve to `tunemesh` and its
modules (an import hook, so `tinker.types.tensor_data` is `tunemesh.types.tensor_data`,
not a second copy), then imports the modules the cookbook's recipes load. A second test
reads the cookbook's source for every name it takes from `tinker` and checks tunemesh has
it, so a name used only inside a function (not reached by importing) is caught too.

Skipped where tinker-cookbook is not installed; its own dependencies (chz, blobfile,
datasets, termcolor, math-verify, ...) must be, or the import test fails naming them.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

COOKBOOK_MODULES = (
    "tinker_cookbook.renderers",
    "tinker_cookbook.checkpoint_utils",
    "tinker_cookbook.supervised.train",
    "tinker_cookbook.rl.train",
    "tinker_cookbook.recipes.math_rl.train",
)

ALIAS_HOOK = '''
import importlib, importlib.abc, importlib.util, sys

class TinkerIsTunemesh(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`tinker` and `tinker.X` are the modules `tunemesh` and `tunemesh.X`."""

    def find_spec(self, name, path=None, target=None):
        if name == "tinker" or name.startswith("tinker."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def __init__(self):
        self.specs = {}

    def create_module(self, spec):
        module = importlib.import_module("tunemesh" + spec.name[len("tinker"):])
        self.specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self.specs[module.__name__]  # the import system set the alias's spec

sys.meta_path.insert(0, TinkerIsTunemesh())
'''

CHECK = ALIAS_HOOK + '''
import tinker, tunemesh
assert tinker is tunemesh and tinker.__spec__.name == "tunemesh"
failed = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
import tinker.types.tensor_data, tunemesh.types.tensor_data
assert tinker.types.tensor_data.TensorData is tunemesh.TensorData
assert not [m for m in sys.modules if m.startswith("tinker.") and sys.modules[m].__name__.startswith("tinker")]
print("\\n".join(failed) or "ok")
'''

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tinker_cookbook") is None, reason="tinker-cookbook is not installed"
)


def test_cookbook_entry_points_import_with_tinker_resolving_to_tunemesh():
    out = subprocess.run([sys.executable, "-c", CHECK, *COOKBOOK_MODULES],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1:] == ["ok"], out.stdout


def test_every_tinker_name_the_cookbook_uses_exists_in_tunemesh():
    used = _tinker_names_used_by_the_cookbook()
    assert {"TinkerError", "RestClient", "types.LossFnType", "lib.public_interfaces.rest_client.RestClient"} <= used
    missing = sorted(name for name in used if not _resolves(name))
    assert not missing


def _tinker_names_used_by_the_cookbook() -> set[str]:
    """`X`, `types.X` or `module.path.X` for every name the cookbook takes from tinker:
    `tinker.X`, `tinker.types.X`, `from tinker[.module] import X`, and `types.X` in a
    module that did `from tinker import types`."""
    root = pathlib.Path(importlib.util.find_spec("tinker_cookbook").origin).parent
    names: set[str] = set()
    for path in root.rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        names |= set(re.findall(r"(?<![\w./])tinker\.((?:types\.)?[A-Za-z_]\w*)", source))  # not in a URL
        for module, imported in re.findall(r"^\s*from tinker((?:\.\w+)*) import \(?([\w ,]+)", source, re.M):
            prefix = module.lstrip(".") + "." if module else ""
            names |= {prefix + n.split(" as ")[0].strip() for n in imported.split(",") if n.strip()}
        if re.search(r"^\s*from tinker import [^\n]*\btypes\b", source, re.M):
            names |= {"types." + n for n in re.findall(r"(?<![\w.])types\.([A-Z]\w*)", source)}
    return names


def _resolves(name: str) -> bool:
    """Whether `tunemesh.<name>` is an attribute, importing modules along the path."""
    import tunemesh

    value: object = tunemesh
    parts = name.split(".")
    for i, part in enumerate(parts):
        if not hasattr(value, part):
            try:
                value = importlib.import_module(".".join(["tunemesh", *parts[: i + 1]]))
                continue
            except ImportError:
                return False
        value = getattr(value, part)
    return True
