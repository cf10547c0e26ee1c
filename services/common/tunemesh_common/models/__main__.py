"""`python -m tunemesh_common.models materialize NAME --data-dir DIR` prints the model dir."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from tunemesh.errors import TunemeshError
from tunemesh_common.models.registry import ModelRegistry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunemesh_common.models")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="print registered model names")
    materialize = commands.add_parser("materialize", help="build/cache a model, print its dir")
    materialize.add_argument("name")
    for sub in commands.choices.values():
        sub.add_argument("--data-dir", type=Path, required=True)
        sub.add_argument("--config", type=Path, help="JSON/TOML list of local model dirs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the answer alone (libraries log to stdout)
            registry = ModelRegistry.default(args.data_dir, config_file=args.config)
            answer = "\n".join(registry.names()) if args.command == "list" else str(registry.materialize(args.name))
        print(answer)
    except TunemeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
