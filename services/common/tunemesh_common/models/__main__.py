"""`python -m tunemesh_common.models materialize NAME --data-dir DIR` prints the model dir."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tunemesh_common.errors import TunemeshError
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
        registry = ModelRegistry.default(args.data_dir, config_file=args.config)
        if args.command == "list":
            print("\n".join(registry.names()))
        else:
            print(registry.materialize(args.name))
    except TunemeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
