"""Tokenizer files per base model, fetched once from a trainer that serves it.

Besides the tokenizer files the answer always holds a `config.json`: Hugging Face loaders
reading a hub cache (`AutoTokenizer.from_pretrained("org/name")` with HF_HUB_OFFLINE=1,
as the Tinker SDK and cookbook do) refuse a snapshot without one. It is the model's own
when the trainer ships it, else MINIMAL_CONFIG.
"""

from __future__ import annotations

from collections.abc import Iterable

from tunemesh.v1 import sessions_pb2
from tunemesh.errors import UnavailableError
from tunemesh_scheduler.nodes import TrainerDirectory
from tunemesh_scheduler.trainer_client import GrpcTrainerPort

CONFIG_FILE = "config.json"
# No model_type: the scheduler does not know the architecture, and a guessed one could
# steer AutoTokenizer to another tokenizer class; without one it takes the class that
# tokenizer_config.json names (transformers 5; checked in tests/unit/local/test_hub_cache.py).
MINIMAL_CONFIG = b"{}\n"


class TokenizerCache:
    def __init__(self, directory: TrainerDirectory, trainers: GrpcTrainerPort) -> None:
        self._directory = directory
        self._trainers = trainers
        self._files: dict[str, list[sessions_pb2.TokenizerFile]] = {}

    async def files(self, base_model: str) -> list[sessions_pb2.TokenizerFile]:
        if base_model not in self._files:
            self._directory.model(base_model)  # NotFoundError for unknown models
            last_error = None
            for node_id in self._directory.serving(base_model):
                try:
                    response = await self._trainers.tokenizer_files(node_id)
                except UnavailableError as err:
                    last_error = err
                    continue
                if not response.files:
                    continue
                self._files[base_model] = with_config(response.files)
                break
            else:
                raise last_error or UnavailableError("NO_TRAINER", f"no trainer of {base_model} answered")
        return self._files[base_model]


def with_config(files: Iterable[sessions_pb2.TokenizerFile]) -> list[sessions_pb2.TokenizerFile]:
    """`files`, plus MINIMAL_CONFIG as `config.json` when they hold none."""
    files = list(files)
    if not any(f.name == CONFIG_FILE for f in files):
        files.append(sessions_pb2.TokenizerFile(name=CONFIG_FILE, content=MINIMAL_CONFIG))
    return files
