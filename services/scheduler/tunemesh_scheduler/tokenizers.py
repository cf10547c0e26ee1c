"""Tokenizer files per base model, fetched once from a trainer that serves it."""

from __future__ import annotations

from tunemesh.v1 import sessions_pb2
from tunemesh.errors import UnavailableError
from tunemesh_scheduler.nodes import TrainerDirectory
from tunemesh_scheduler.trainer_client import GrpcTrainerPort


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
                self._files[base_model] = list(response.files)
                break
            else:
                raise last_error or UnavailableError("NO_TRAINER", f"no trainer of {base_model} answered")
        return self._files[base_model]
