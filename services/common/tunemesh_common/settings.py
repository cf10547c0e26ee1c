"""Settings loading shared by services: flags, else environment variables, else defaults."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib


def _field_type(field: dataclasses.Field):
    default = field.default
    if isinstance(default, bool):
        return lambda s: s.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    if isinstance(default, pathlib.Path) or field.name.endswith(("_dir", "_file")):
        return lambda s: pathlib.Path(s).expanduser()
    return str


def load(cls, prefix: str, argv: list[str] | None = None):
    """Build settings from flags (`--max-adapters 8`) over environment over defaults."""
    parser = argparse.ArgumentParser(description=cls.__doc__)
    values = {}
    for field in dataclasses.fields(cls):
        env = os.environ.get(prefix + field.name.upper())
        parser.add_argument("--" + field.name.replace("_", "-"), type=_field_type(field), default=None)
        if env is not None:
            values[field.name] = _field_type(field)(env)
    args = parser.parse_args(argv)
    values.update({k: v for k, v in vars(args).items() if v is not None})
    return cls(**values)
