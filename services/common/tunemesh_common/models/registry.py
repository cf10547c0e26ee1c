"""The model registry: names -> base model metadata and a local HF checkpoint directory."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from tunemesh.errors import InvalidArgumentError, NotFoundError
from tunemesh_common.models import cache, smollm2, tiny, tokenizer
from tunemesh_common.models.entry import DENSE, MOE, ModelEntry, entry_for_local_dir, make_entry

TINY_DENSE = "tunemesh/tiny-dense"
TINY_MOE = "tunemesh/tiny-moe"
SMOLLM2 = smollm2.NAME


@dataclasses.dataclass(frozen=True)
class _Builtin:
    entry: ModelEntry
    revision: str  # bump when the build recipe changes: old caches are then ignored
    build: Callable[[Path], None]


def _builtins() -> dict[str, _Builtin]:
    specs = [
        (TINY_DENSE, DENSE, "Qwen3ForCausalLM", tokenizer.VOCAB_SIZE,
         tiny.MAX_POSITION_EMBEDDINGS, "v1", tiny.build_dense),
        (TINY_MOE, MOE, "Qwen3MoeForCausalLM", tokenizer.VOCAB_SIZE,
         tiny.MAX_POSITION_EMBEDDINGS, "v1", tiny.build_moe),
        (SMOLLM2, DENSE, "LlamaForCausalLM", smollm2.VOCAB_SIZE,
         smollm2.MAX_POSITION_EMBEDDINGS, "v1", smollm2.build),
    ]
    return {
        name: _Builtin(make_entry(name, family, arch, vocab, max_pos), revision, build)
        for name, family, arch, vocab, max_pos, revision, build in specs
    }


class ModelRegistry:
    """Built-in models plus local HF directories registered by configuration."""

    def __init__(self, data_dir: Path, local: Iterable[ModelEntry] = ()) -> None:
        self._data_dir = Path(data_dir).expanduser()
        self._builtins = _builtins()
        self._entries = {name: b.entry for name, b in self._builtins.items()}
        for entry in local:
            if entry.local_path is None:
                raise InvalidArgumentError("INVALID_MODEL_DIR", f"{entry.name}: no local_path")
            if entry.name in self._entries:
                raise InvalidArgumentError("DUPLICATE_MODEL", f"model {entry.name!r} registered twice")
            self._entries[entry.name] = entry

    @classmethod
    def default(
        cls,
        data_dir: Path,
        extra: Mapping[str, Path] | None = None,
        config_file: Path | None = None,
    ) -> ModelRegistry:
        """Built-ins + `extra` (name -> HF dir) + the models listed in `config_file`."""
        local = [entry_for_local_dir(name, path) for name, path in (extra or {}).items()]
        if config_file is not None:
            local += load_model_list(config_file)
        return cls(data_dir, local)

    def names(self) -> list[str]:
        """Registered model names, sorted."""
        return sorted(self._entries)

    def entry(self, name: str) -> ModelEntry:
        """The entry of `name`; NotFoundError(UNKNOWN_MODEL) if unregistered."""
        try:
            return self._entries[name]
        except KeyError:
            raise NotFoundError("UNKNOWN_MODEL", f"unknown base model {name!r}") from None

    def materialize(self, name: str) -> Path:
        """The model's HF directory, built and cached under the data dir on first use."""
        entry = self.entry(name)
        if entry.local_path is not None:
            if not (entry.local_path / "config.json").is_file():
                raise NotFoundError("MODEL_DIR_MISSING", f"{name}: {entry.local_path} is gone")
            return entry.local_path
        builtin = self._builtins[name]
        return cache.publish_once(self.cache_dir(name), builtin.build)

    def cache_dir(self, name: str) -> Path:
        """Where a built-in model is (or will be) materialised."""
        builtin = self._builtins.get(name)
        if builtin is None:
            raise NotFoundError("UNKNOWN_MODEL", f"{name!r} is not a built-in model")
        return self._data_dir / "models" / name.replace("/", "--") / builtin.revision


def load_model_list(path: Path) -> list[ModelEntry]:
    """Read local model dirs from a JSON or TOML file.

    Format: a list (JSON) or a `models` array of tables, each `{name, path[, family]}`;
    relative paths are relative to the file.
    """
    path = Path(path)
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError("INVALID_MODEL_LIST", f"cannot read {path}: {exc}") from exc
    items = data.get("models", []) if isinstance(data, dict) else data
    entries = []
    for item in items:
        if not isinstance(item, dict) or not {"name", "path"} <= item.keys():
            raise InvalidArgumentError("INVALID_MODEL_LIST", f"{path}: need name and path in {item!r}")
        model_dir = path.parent / Path(item["path"]).expanduser()
        entries.append(entry_for_local_dir(item["name"], model_dir, item.get("family")))
    return entries
