"""Generate the Python stubs and type stubs of every .proto under protos/.

    python scripts/gen_protos.py          # write into sdk/
    python scripts/gen_protos.py --check  # fail if sdk/ differs from the protos

The generated modules live in the SDK package (`tunemesh.v1`, `tunemesh.internal.v1`)
because every process, clients included, speaks these contracts.
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "sdk"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


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
    generated = sorted(p.relative_to(out) for p in out.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))
    for package_dir in {p.parent for p in generated}:
        for parent in [package_dir, *package_dir.parents]:
            if parent == pathlib.Path(".") or parent == pathlib.Path("tunemesh"):
                continue
            init = out / parent / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated from protos/ by scripts/gen_protos.py; do not edit."""\n')
    return generated


def existing_generated() -> list[pathlib.Path]:
    return sorted(
        p.relative_to(OUT_ROOT) for p in OUT_ROOT.rglob("*") if p.name.endswith(GENERATED_SUFFIXES)
    )


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(pathlib.Path(tmp))
        committed = existing_generated()
        problems = [f"missing or extra: {p}" for p in sorted(set(fresh) ^ set(committed))]
        problems += [
            f"differs: sdk/{p}"
            for p in sorted(set(fresh) & set(committed))
            if not filecmp.cmp(pathlib.Path(tmp) / p, OUT_ROOT / p, shallow=False)
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
    with tempfile.TemporaryDirectory() as tmp:  # a protoc error leaves sdk/ untouched
        generated = generate(pathlib.Path(tmp))
        for stale in existing_generated():
            (OUT_ROOT / stale).unlink()
        for path in generated:
            (OUT_ROOT / path).write_bytes((pathlib.Path(tmp) / path).read_bytes())
    print(f"generated {len(generated)} files from {len(proto_files())} protos into sdk/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
