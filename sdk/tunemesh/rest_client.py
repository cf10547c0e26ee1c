"""RestClient and AdminClient: Tinker's clients for runs and checkpoints, over tunemesh's calls.

RestClient maps Tinker's calls onto GetCapabilities, GetTrainingRun, ListTrainingRuns and
the CheckpointService. Every call returns an APIFuture at once (`.result()` or `await`);
a malformed path raises ValueError at the call. Paths are tunemesh:// or tinker://
(see ParsedCheckpointTinkerPath); a run is `runs/{id}` or its bare id. tunemesh shows a
caller only its own runs and checkpoints, whatever `access_scope` asks for.

Tinker calls with no tunemesh counterpart (sessions, projects, publishing, external
weights, billing, the audit log) raise NotImplementedError saying why.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

from tunemesh import _wire
from tunemesh.checkpoints import Checkpoint, checkpoint_from_proto
from tunemesh.client import ServiceClient
from tunemesh.futures import APIFuture
from tunemesh.transport import Transport
from tunemesh.types import (
    CheckpointsListResponse,
    Cursor,
    GetInfoResponse,
    GetServerCapabilitiesResponse,
    ParsedCheckpointTinkerPath,
    TrainingRunsResponse,
    WeightsInfoResponse,
)
from tunemesh.v1 import checkpoints_pb2, sessions_pb2, training_pb2

T = TypeVar("T")

_PRIVATE = "tunemesh checkpoints are private to their tenant"
_NO_SESSIONS = "tunemesh does not list or export sessions"
_UNSUPPORTED = {
    "get_external_weights_urls": "tunemesh has no external weights; fetch a checkpoint's files with "
                                 "ServiceClient.create_checkpoint_client().download(path, dir)",
    "copy_weights": "tunemesh has no projects to copy checkpoints between",
    "publish_checkpoint_from_tinker_path": _PRIVATE,
    "unpublish_checkpoint_from_tinker_path": _PRIVATE,
    "get_session": _NO_SESSIONS,
    "list_sessions": _NO_SESSIONS,
    "search_sessions": _NO_SESSIONS,
    "export_session_trace": _NO_SESSIONS,
    "assign_session_project": "tunemesh has no projects",
    "whoami": "tunemesh does not report the caller's identity",
    "get_sampler": "tunemesh does not look up sampling sessions by id",
    "get_billing_usage": "tunemesh keeps no billing records",
    "get_current_checkpoint_storage_usage": "tunemesh does not report storage usage",
    "get_audit_log": "tunemesh keeps no audit log",
}


class RestClient:
    """Runs and checkpoints of the caller, Tinker-style.

    `RestClient(base_url=..., api_key=...)` opens its own connection, as
    `ServiceClient(base_url, api_key, **options)` would (both default to
    $TUNEMESH_ADDRESS and $TUNEMESH_API_KEY; close it with `close()`);
    `ServiceClient.create_rest_client()` shares that client's connection.
    """

    def __init__(
        self, _transport: Transport | None = None, *, base_url: str | None = None,
        api_key: str | None = None, **options: Any,
    ) -> None:
        self._owner: ServiceClient | None = None
        if _transport is None:
            self._owner = ServiceClient(base_url, api_key, **options)
            _transport = self._owner._transport
        elif base_url is not None or api_key is not None or options:
            raise ValueError("base_url, api_key and options apply to a RestClient's own connection")
        self._transport = _transport

    def get_server_capabilities(self) -> APIFuture[GetServerCapabilitiesResponse]:
        """The base models served now and the per-request limits."""
        async def get() -> GetServerCapabilitiesResponse:
            request = sessions_pb2.GetCapabilitiesRequest()
            return _wire.capabilities(await self._call(self._transport.sessions.GetCapabilities, request))

        return self._submit(get())

    def get_training_run(self, training_run_id: str, access_scope: str = "owned") -> APIFuture[GetInfoResponse]:
        """The run `training_run_id` (`runs/{id}` or `{id}`)."""
        return self._submit(self._get_run(_run_name(training_run_id)))

    def get_training_run_by_tinker_path(
        self, tinker_path: str, access_scope: str = "owned",
    ) -> APIFuture[GetInfoResponse]:
        """The run that wrote the checkpoint at `tinker_path`; ValueError for an import."""
        run = ParsedCheckpointTinkerPath.from_tinker_path(tinker_path).run
        if not run:
            raise ValueError(f"{tinker_path!r} is an imported checkpoint: no training run wrote it")
        return self._submit(self._get_run(run))

    def get_weights_info_by_tinker_path(self, tinker_path: str) -> APIFuture[WeightsInfoResponse]:
        """The checkpoint's base model and LoRA shape."""
        path = ParsedCheckpointTinkerPath.from_tinker_path(tinker_path).tunemesh_path

        async def get() -> WeightsInfoResponse:
            request = checkpoints_pb2.GetCheckpointRequest(path=path)
            response = await self._call(self._transport.checkpoints.GetCheckpoint, request)
            lora = _wire.lora_from_proto(response.checkpoint.lora_config)
            return WeightsInfoResponse(
                base_model=response.checkpoint.base_model, lora_rank=lora.rank,
                train_unembed=lora.train_unembed, train_mlp=lora.train_mlp, train_attn=lora.train_attn,
            )

        return self._submit(get())

    def list_training_runs(
        self, limit: int = 20, offset: int = 0, access_scope: str = "owned", project_id: str | None = None,
    ) -> APIFuture[TrainingRunsResponse]:
        """`limit` of the caller's runs from `offset`, oldest first."""
        async def list_runs() -> TrainingRunsResponse:
            request = training_pb2.ListTrainingRunsRequest()
            pages = await self._pages(self._transport.training.ListTrainingRuns, request)
            runs = [_wire.run_info(run) for page in pages for run in page.runs]
            return TrainingRunsResponse(runs[offset:offset + limit], Cursor(offset, limit, len(runs)))

        return self._submit(list_runs())

    def list_checkpoints(self, training_run_id: str) -> APIFuture[CheckpointsListResponse]:
        """Every checkpoint of the run, by path."""
        run = _run_name(training_run_id)

        async def list_run() -> CheckpointsListResponse:
            return CheckpointsListResponse(await self._checkpoints(run))

        return self._submit(list_run())

    def list_user_checkpoints(self, limit: int = 100, offset: int = 0) -> APIFuture[CheckpointsListResponse]:
        """`limit` of the caller's checkpoints from `offset`, newest first."""
        async def list_all() -> CheckpointsListResponse:
            checkpoints = sorted(await self._checkpoints(""), key=lambda c: c.create_time, reverse=True)
            cursor = Cursor(offset, limit, len(checkpoints))
            return CheckpointsListResponse(checkpoints[offset:offset + limit], cursor)

        return self._submit(list_all())

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> APIFuture[None]:
        """Delete checkpoint `checkpoint_id` (`weights/{name}` or `sampler_weights/{name}`) of the run."""
        run_id = training_run_id.removeprefix("runs/")
        return self.delete_checkpoint_from_tinker_path(f"tinker://{run_id}/{checkpoint_id}")

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        """Delete the checkpoint at `tinker_path`."""
        path = ParsedCheckpointTinkerPath.from_tinker_path(tinker_path).tunemesh_path
        request = checkpoints_pb2.DeleteCheckpointRequest(path=path)
        return self._submit(self._done(self._transport.checkpoints.DeleteCheckpoint, request))

    def set_checkpoint_ttl_from_tinker_path(self, tinker_path: str, ttl_seconds: int | None) -> APIFuture[None]:
        """Expire the checkpoint `ttl_seconds` from now; None removes its expiry."""
        if ttl_seconds is not None and ttl_seconds < 1:
            raise ValueError(f"ttl_seconds must be at least 1 (or None), got {ttl_seconds}")
        path = ParsedCheckpointTinkerPath.from_tinker_path(tinker_path).tunemesh_path
        request = checkpoints_pb2.UpdateCheckpointTtlRequest(path=path, ttl_seconds=ttl_seconds or 0)
        return self._submit(self._done(self._transport.checkpoints.UpdateCheckpointTtl, request))

    def close(self) -> None:
        """Close the connection this client opened (none if it shares a ServiceClient's)."""
        if self._owner is not None:
            self._owner.close()

    def __enter__(self) -> RestClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Callable[..., NoReturn]:
        if name not in _UNSUPPORTED:
            raise AttributeError(f"'RestClient' object has no attribute {name!r}")
        return _unsupported(f"RestClient.{name}", _UNSUPPORTED[name])

    async def _get_run(self, run: str) -> GetInfoResponse:
        request = training_pb2.GetTrainingRunRequest(name=run)
        response = await self._call(self._transport.training.GetTrainingRun, request)
        return _wire.run_info(response.run)

    async def _checkpoints(self, run: str) -> list[Checkpoint]:
        pages = await self._pages(self._transport.checkpoints.ListCheckpoints,
                                  checkpoints_pb2.ListCheckpointsRequest(run=run))
        return [checkpoint_from_proto(c) for page in pages for c in page.checkpoints]

    async def _pages(self, method: Any, request: Any) -> list[Any]:
        """Every response of a list call, following page tokens from `request`'s."""
        pages = [await self._call(method, request)]
        while pages[-1].next_page_token:
            request.page_token = pages[-1].next_page_token
            pages.append(await self._call(method, request))
        return pages

    async def _done(self, method: Any, request: Any) -> None:
        await self._call(method, request)

    async def _call(self, method: Any, request: Any) -> Any:
        """One unary call of a stub `method`, retried like every SDK call."""
        what = type(request).__name__.removesuffix("Request")
        return await self._transport.call_async(method, request, what=what)

    def _submit(self, coro: Coroutine[Any, Any, T]) -> APIFuture[T]:
        return APIFuture(self._transport.loop.submit(coro))


class AdminClient:
    """Tinker's organization-admin client. tunemesh keeps no audit log, billing or storage
    records, so each call raises NotImplementedError; constructing one connects nothing."""

    def __init__(self, _holder: Any = None, *, base_url: str | None = None, api_key: str | None = None) -> None:
        pass

    def get_audit_log(self, event_type: str = "all", day: Any = None) -> NoReturn:
        _unsupported("AdminClient.get_audit_log", _UNSUPPORTED["get_audit_log"])()

    def get_billing_usage(self, *args: Any, **kwargs: Any) -> NoReturn:
        _unsupported("AdminClient.get_billing_usage", _UNSUPPORTED["get_billing_usage"])()

    def get_current_checkpoint_storage_usage(self, *args: Any, **kwargs: Any) -> NoReturn:
        _unsupported("AdminClient.get_current_checkpoint_storage_usage",
                     _UNSUPPORTED["get_current_checkpoint_storage_usage"])()


def _unsupported(call: str, why: str) -> Callable[..., NoReturn]:
    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(f"{call} is not supported: {why}")

    return refuse


def _run_name(training_run_id: str) -> str:
    """`runs/{id}` of a run name or a bare run id."""
    return training_run_id if training_run_id.startswith("runs/") else f"runs/{training_run_id}"
