"""Generate the Python stubs and type stubs of every .proto under protos/.

    python scripts/gen_protos.py          # write the stubs
    python scripts/gen_protos.py --check  # fail if the committed stubs differ from the protos

The public contract (`tunemesh.v1`) goes into the SDK package, which clients and services
both import. The service-to-service contract (`tunemesh.internal.v1`) goes into the
server-side package `tunemesh_internal` (services/common/tunemesh_internal): no client needs
it, so the SDK does not ship it. protoc names Python modules after the proto's path, so the
internal stubs' own imports and module names are rewritten from `tunemesh.internal.v1` to
`tunemesh_internal.v1`; the proto package, the wire names and the RPC paths stay
`tunemesh.internal.v1`.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
# where each proto package's stubs live: generated directory -> (output root, Python directory)
DESTINATIONS = {
    pathlib.Path("tunemesh/v1"): (ROOT / "sdk", pathlib.Path("tunemesh/v1")),
    pathlib.Path("tunemesh/internal/v1"): (ROOT / "services/common", pathlib.Path("tunemesh_internal/v1")),
}
# the internal stubs' Python module paths (imports, and the module name the builder gives
# message classes); RPC paths such as '/tunemesh.internal.v1.TrainerService/...' keep theirs
_INTERNAL_MODULE = re.compile(r"(^from |^import |')tunemesh\.internal\.v1(?= import|\.\w+_pb2')", re.MULTILINE)


def proto_files() -> list[pathlib.Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc into `out`; return the generated files relative to `out`."""
    from grpc_tools import protoc  # build-time dependency, imported only here

    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out) for p in out.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def destination(generated: pathlib.Path) -> pathlib.Path:
    """Where a file protoc wrote (relative to its output dir) belongs in the repository."""
    root, package = DESTINATIONS[generated.parent]
    return root / package / generated.name


def contents(generated_file: pathlib.Path, relative: pathlib.Path) -> bytes:
    text = generated_file.read_text()
    if relative.parent == pathlib.Path("tunemesh/internal/v1"):
        text = _INTERNAL_MODULE.sub(r"\1tunemesh_internal.v1", text)
    return text.encode()


def existing_generated() -> list[pathlib.Path]:
    """The committed generated files, as repository paths."""
    found = []
    for root, package in DESTINATIONS.values():
        found += [p for p in (root / package).glob("*") if p.name.endswith(GENERATED_SUFFIXES)]
    return sorted(found)


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {destination(p): contents(pathlib.Path(tmp) / p, p) for p in generate(pathlib.Path(tmp))}
        committed = existing_generated()
        problems = [f"missing or extra: {p.relative_to(ROOT)}" for p in sorted(set(fresh) ^ set(committed))]
        problems += [
            f"differs: {p.relative_to(ROOT)}"
            for p in sorted(set(fresh) & set(committed))
            if p.read_bytes() != fresh[p]
        ]
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print("generated code drifted from protos/: run python scripts/gen_protos.py", file=sys.stderr)
        return 1
    print(f"generated code matches {len(proto_files())} proto files")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if args.check:
        return check()
    with tempfile.TemporaryDirectory() as tmp:  # a protoc error leaves the tree untouched
        generated = generate(pathlib.Path(tmp))
        for stale in existing_generated():
            stale.unlink()
        for path in generated:
            target = destination(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            for package_dir in [target.parent, target.parent.parent]:
                init = package_dir / "__init__.py"
                if not init.exists():
                    init.write_text('"""Generated from protos/ by scripts/gen_protos.py; do not edit."""\n')
            target.write_bytes(contents(pathlib.Path(tmp) / path, path))
    print(f"generated {len(generated)} files from {len(proto_files())} protos")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
