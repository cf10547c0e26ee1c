"""Tokenizers fetched from the service: cached on disk by content hash, loaded locally.

No model hub is involved: the files come from GetTokenizer, land in
`<cache root>/<sha256 of the files>/`, and load with transformers' AutoTokenizer when
transformers is installed, else with the `tokenizers` library.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

DEFAULT_CACHE_ROOT = pathlib.Path.home() / ".cache" / "tunemesh" / "tokenizers"


def default_cache_root() -> pathlib.Path:
    """`$TUNEMESH_CACHE_DIR/tokenizers` if set, else ~/.cache/tunemesh/tokenizers."""
    root = os.environ.get("TUNEMESH_CACHE_DIR")
    return pathlib.Path(root) / "tokenizers" if root else DEFAULT_CACHE_ROOT


def content_hash(files: Sequence[tuple[str, bytes]]) -> str:
    digest = hashlib.sha256()
    for name, content in sorted(files):
        digest.update(name.encode() + b"\0" + len(content).to_bytes(8, "little") + content)
    return digest.hexdigest()


def materialize(files: Sequence[tuple[str, bytes]], cache_root: pathlib.Path) -> pathlib.Path:
    """Write the files into their content-addressed directory (atomically) and return it."""
    if not files:
        raise ValueError("the service returned no tokenizer files")
    for name, _ in files:
        if not name or name != pathlib.PurePath(name).name or name in (".", ".."):
            raise ValueError(f"refusing tokenizer file name {name!r}")
    target = cache_root / content_hash(files)
    if target.is_dir():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".staging-", dir=cache_root))
    for name, content in files:
        (staging / name).write_bytes(content)
    try:
        staging.rename(target)
    except OSError:  # another process won the race; its copy has the same content
        for child in staging.iterdir():
            child.unlink()
        staging.rmdir()
    return target


_IMPORT_LOCK = threading.Lock()  # transformers' lazy modules are not safe to import from two threads


def load(directory: pathlib.Path) -> Any:
    """AutoTokenizer if transformers is installed, else a `tokenizers.Tokenizer`."""
    with _IMPORT_LOCK:
        if importlib.util.find_spec("transformers") is None:
            from tokenizers import Tokenizer

            return Tokenizer.from_str((directory / "tokenizer.json").read_text())
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory))
