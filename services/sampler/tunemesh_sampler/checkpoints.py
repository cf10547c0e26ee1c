"""Adapters fetched from the checkpoint service into local PEFT directories for the engine."""

from __future__ import annotations

import asyncio
import pathlib
import shutil

from tunemesh_common.lora import peft_format
from tunemesh_common.checkpoints.client import CheckpointStorageClient
from tunemesh.errors import FailedPreconditionError
from tunemesh_sampler.metrics import SamplerMetrics
from tunemesh_sampler.adapters import AdapterRef
from tunemesh_sampler.engine import SamplingEngine


class AdapterLoader:
    """`load` / `unload` for the AdapterCache: checkpoint -> `<cache_dir>/<key>/` -> engine."""

    def __init__(self, engine: SamplingEngine, storage: CheckpointStorageClient, cache_dir: pathlib.Path,
                 metrics: SamplerMetrics | None = None) -> None:
        self._engine, self._storage, self._cache_dir = engine, storage, cache_dir
        self._metrics = metrics or SamplerMetrics()
        shutil.rmtree(cache_dir, ignore_errors=True)  # nothing is resident at start
        cache_dir.mkdir(parents=True, exist_ok=True)

    async def load(self, ref: AdapterRef) -> None:
        with self._metrics.adapter_load():
            await self._load(ref)

    async def _load(self, ref: AdapterRef) -> None:
        checkpoint, files = await self._storage.read(ref.tenant, ref.path)
        if checkpoint.base_model != self._engine.info.name:
            raise FailedPreconditionError(
                "WRONG_BASE_MODEL", f"{ref.path} is for {checkpoint.base_model}, this sampler serves {self._engine.info.name}"
            )
        directory = await asyncio.to_thread(self._write, ref.key, files)
        await asyncio.to_thread(self._engine.load_adapter, ref.key, directory)

    async def unload(self, key: str) -> None:
        await asyncio.to_thread(self._engine.unload_adapter, key)
        await asyncio.to_thread(shutil.rmtree, self._cache_dir / key, True)

    def _write(self, key: str, files: dict[str, bytes]) -> pathlib.Path:
        directory = self._cache_dir / key
        staging = self._cache_dir / f".{key}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for name in (peft_format.CONFIG_FILE, peft_format.WEIGHTS_FILE):  # optimizer state is not needed
            (staging / name).write_bytes(files[name])
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)
        return directory
