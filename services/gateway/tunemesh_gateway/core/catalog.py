"""The REST reads and edits of runs and checkpoints (Tinker's RestClient)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from tunemesh.errors import InvalidArgumentError
from tunemesh.v1 import checkpoints_pb2, training_pb2

from tunemesh_gateway import convert
from tunemesh_gateway.core.names import Names
from tunemesh_gateway.core.ports import Caller, Upstream

PAGE = 100
MIN_TTL_S, MAX_TTL_S = 3600, 10 * 365 * 24 * 3600  # Tinker's range of a checkpoint TTL


class CatalogCore:
    def __init__(self, upstream: Upstream, names: Names, timeout_s: float) -> None:
        self._up, self._names, self._timeout_s = upstream, names, timeout_s

    async def training_run(self, caller: Caller, training_run_id: str) -> dict[str, Any]:
        request = training_pb2.GetTrainingRunRequest(name=await self._names.run(caller, training_run_id))
        run = (await self._call(caller, self._up.training.GetTrainingRun, request)).run
        return convert.training_run(run, training_run_id)

    async def training_runs(self, caller: Caller, limit: int, offset: int) -> dict[str, Any]:
        runs = [run async for run in self._pages(caller, self._up.training.ListTrainingRuns,
                                                 training_pb2.ListTrainingRunsRequest, lambda r: r.runs)]
        ids = await self._names.model_ids(run.name for run in runs)
        page = runs[offset:offset + limit]
        named = [(run, run.user_metadata.get(convert.MODEL_ID_LABEL) or ids[run.name]) for run in page]
        return {"training_runs": [convert.training_run(run, model) for run, model in named],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)}}

    async def checkpoints(self, caller: Caller, training_run_id: str) -> dict[str, Any]:
        run = await self._names.run(caller, training_run_id)
        found = [ck async for ck in self._checkpoints(caller, run)]
        return {"checkpoints": [convert.checkpoint(ck, training_run_id) for ck in found], "cursor": None}

    async def user_checkpoints(self, caller: Caller, limit: int, offset: int) -> dict[str, Any]:
        found = [ck async for ck in self._checkpoints(caller, "")]
        ids = await self._names.model_ids({convert.run_of_path(ck.path) for ck in found} - {""})
        page = [convert.checkpoint(ck, ids.get(convert.run_of_path(ck.path), convert.IMPORTS))
                for ck in found[offset:offset + limit]]
        return {"checkpoints": page, "cursor": {"offset": offset, "limit": limit, "total_count": len(found)}}

    async def delete_checkpoint(self, caller: Caller, training_run_id: str, kind: str, name: str) -> None:
        path = await self._path(caller, training_run_id, kind, name)
        request = checkpoints_pb2.DeleteCheckpointRequest(path=path)
        await self._call(caller, self._up.checkpoints.DeleteCheckpoint, request)

    async def set_ttl(self, caller: Caller, training_run_id: str, kind: str, name: str, ttl_s: int | None) -> None:
        """A TTL of 1 hour to 10 years, or None: never expires."""
        if ttl_s is not None and not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
            raise InvalidArgumentError("BAD_TTL", f"ttl_seconds must lie in [{MIN_TTL_S}, {MAX_TTL_S}], or be null")
        path = await self._path(caller, training_run_id, kind, name)
        request = checkpoints_pb2.UpdateCheckpointTtlRequest(path=path, ttl_seconds=ttl_s or 0)
        await self._call(caller, self._up.checkpoints.UpdateCheckpointTtl, request)

    async def weights_info(self, caller: Caller, tinker_path: str) -> dict[str, Any]:
        request = checkpoints_pb2.GetCheckpointRequest(path=await self._names.tunemesh_path(caller, tinker_path))
        return convert.weights_info((await self._call(caller, self._up.checkpoints.GetCheckpoint, request)).checkpoint)

    async def _path(self, caller: Caller, training_run_id: str, kind: str, name: str) -> str:
        return await self._names.tunemesh_path(caller, f"{convert.TINKER_SCHEME}{training_run_id}/{kind}/{name}")

    def _checkpoints(self, caller: Caller, run: str) -> AsyncIterator[checkpoints_pb2.Checkpoint]:
        def request(page_size: int, page_token: str) -> checkpoints_pb2.ListCheckpointsRequest:
            return checkpoints_pb2.ListCheckpointsRequest(run=run, page_size=page_size, page_token=page_token)

        return self._pages(caller, self._up.checkpoints.ListCheckpoints, request, lambda r: r.checkpoints)

    async def _pages(self, caller: Caller, method: Any, request: Callable[..., Any],
                     items: Callable[[Any], Any]) -> AsyncIterator[Any]:
        token = ""
        while True:
            response = await self._call(caller, method, request(page_size=PAGE, page_token=token))
            for item in items(response):
                yield item
            token = response.next_page_token
            if not token:
                return

    async def _call(self, caller: Caller, method: Any, request: Any) -> Any:
        return await self._up.call(caller, method, request, self._timeout_s)
