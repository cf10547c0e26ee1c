"""The HTTP face: Tinker's `/api/v1` routes, each decoding its body with the SDK's own
types, calling core and encoding the answer. Bodies are JSON except the
`forward_backward` request and the ForwardBackwardOutput / SampleResponse results of
`retrieve_future`, which are protobuf when the client accepts it (the SDK always does).

Every error is a JSON `{"detail": ...}` with the status `status.py` gives it; a route
Tinker has and tunemesh does not answers 400 `unsupported: <METHOD /path>`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pydantic
import prometheus_client
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf.message import DecodeError, Message
from tinker import types as tt
from tinker.proto import tinker_public_pb2 as tpb

from tunemesh.errors import Code, TunemeshError

from tunemesh_gateway import convert
from tunemesh_gateway.core import Caller, CoreConfig, GatewayCore, GatewayStore, Upstream
from tunemesh_gateway.key_guard import KeyCheck, KeyGuard
from tunemesh_gateway.metrics import GatewayMetrics
from tunemesh_gateway.status import HttpError, Unsupported, detail, http_status

log = logging.getLogger(__name__)

PROTOBUF = "application/x-protobuf"
MAX_BODY_BYTES = 256 * 1024 * 1024


def create_app(make_upstream: Callable[[], Upstream], store: GatewayStore, config: CoreConfig = CoreConfig(),
               metrics: GatewayMetrics | None = None, ready: Callable[[], bool] | None = None,
               keys: KeyCheck | KeyGuard | None = None) -> FastAPI:
    """The app; `make_upstream()` runs on the serving loop at startup (a grpc.aio channel
    belongs to the loop it is made on). `ready()` says whether the scheduler answers:
    GET /healthz is 200 while it does, 503 while not (always 200 without `ready`). `keys`
    checks API keys before they are forwarded (default: a KeyGuard; see key_guard.py)."""
    metrics = metrics or GatewayMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        upstream = make_upstream()
        app.state.core = GatewayCore(upstream, store, config)
        try:
            yield
        finally:
            await app.state.core.close()
            if hasattr(upstream, "close"):
                await upstream.close()

    app = FastAPI(title="tunemesh gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.keys = keys or KeyGuard()
    _errors(app)
    _middleware(app, metrics)
    _sessions(app)
    _training(app)
    _sampling(app)
    _catalog(app)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        if ready is None or ready():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"detail": "the scheduler is not reachable"}, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    async def scrape() -> Response:
        return Response(prometheus_client.generate_latest(metrics.registry),
                        media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    async def unsupported(request: Request) -> Response:
        raise Unsupported(f"{request.method} /{request.path_params['path']}")

    return app


def core(request: Request) -> GatewayCore:
    return request.app.state.core


async def caller(request: Request) -> Caller:
    """The Tinker API key, forwarded to the scheduler once the gateway's key check admits it
    (401 for a bad key, 429 while this client must wait after failed ones): key_guard.py."""
    key = request.headers.get("x-api-key", "").strip()
    if not key:
        raise HttpError(401, "send the API key in X-API-Key")
    await request.app.state.keys.admit(key, _client(request), time.monotonic())
    return Caller(key)


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


async def body(request: Request, model: type[pydantic.BaseModel]) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise HttpError(413, f"request body over {MAX_BODY_BYTES} bytes")
    return model.model_validate_json(raw or b"{}")


def _errors(app: FastAPI) -> None:
    @app.exception_handler(TunemeshError)
    async def tunemesh_error(request: Request, err: TunemeshError) -> JSONResponse:
        if err.rpc_code == Code.UNAUTHENTICATED:
            request.app.state.keys.refused(_client(request), request.headers.get("x-api-key", "").strip(),
                                           time.monotonic())
        return _answer(request, http_status(err), detail(err))

    @app.exception_handler(HttpError)
    async def http_error(request: Request, err: HttpError) -> JSONResponse:
        return _answer(request, err.status, err.detail)

    @app.exception_handler(pydantic.ValidationError)
    async def invalid(request: Request, err: pydantic.ValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors(include_url=False)[:5])
        return JSONResponse({"detail": f"invalid request: {problems}"}, status_code=400)

    @app.exception_handler(DecodeError)
    async def undecodable(request: Request, err: DecodeError) -> JSONResponse:
        return JSONResponse({"detail": f"invalid protobuf body: {err}"}, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": "internal gateway error"}, status_code=500)


def _answer(request: Request, status: int, text: str) -> JSONResponse:
    """An error answer; the server's own failures (5xx) are logged."""
    log.log(logging.WARNING if status >= 500 else logging.DEBUG, "%s %s -> %d: %s",
            request.method, request.url.path, status, text)
    return JSONResponse({"detail": text}, status_code=status)


def _middleware(app: FastAPI, metrics: GatewayMetrics) -> None:
    app.add_middleware(_Measure, metrics=metrics)


class _Measure:
    """Times each HTTP request, from its arrival to its answer's last byte, by route. Plain
    ASGI: Starlette's `@app.middleware("http")` (BaseHTTPMiddleware) passes every answer
    through a task group and a memory stream, a cost every call of the SDK paid."""

    def __init__(self, app: Any, metrics: GatewayMetrics) -> None:
        self._app, self._metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        start, status = time.monotonic(), 500

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, sending)
        finally:
            route = scope.get("route")  # set by the router on this same scope
            endpoint = getattr(route, "path", "") if route is not None else ""
            self._metrics.request(endpoint if not endpoint.startswith("/{path") else "unsupported", status,
                                  time.monotonic() - start)


def _sessions(app: FastAPI) -> None:
    @app.post("/api/v1/client/config")
    async def client_config(request: Request) -> dict[str, Any]:
        return await core(request).sessions.client_config(await caller(request))

    @app.post("/api/v1/client/dynamic_config")
    async def dynamic_config(request: Request) -> dict[str, Any]:
        return core(request).sessions.dynamic_config()

    @app.post("/api/v1/create_session")
    async def create_session(request: Request) -> dict[str, Any]:
        asked = await body(request, tt.CreateSessionRequest)
        return await core(request).sessions.create_session(await caller(request), asked)

    @app.post("/api/v1/session_heartbeat")
    async def heartbeat(request: Request) -> dict[str, Any]:
        beat = await body(request, tt.SessionHeartbeatRequest)
        return await core(request).sessions.heartbeat(await caller(request), beat.session_id)

    @app.post("/api/v1/sessions/{session_id}/finish")
    async def finish(request: Request, session_id: str) -> dict[str, Any]:
        return await core(request).sessions.finish(await caller(request), session_id)

    @app.post("/api/v1/telemetry")
    async def telemetry(request: Request) -> dict[str, Any]:
        return {"status": "accepted"}  # dropped: tunemesh has its own metrics and logs

    @app.get("/api/v1/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/api/v1/get_server_capabilities")
    async def capabilities(request: Request) -> dict[str, Any]:
        return await core(request).sessions.capabilities(await caller(request))


def _training(app: FastAPI) -> None:
    @app.post("/api/v1/create_model")
    async def create_model(request: Request) -> dict[str, Any]:
        return await core(request).training.create_model(await caller(request), await body(request, tt.CreateModelRequest))

    @app.post("/api/v1/get_info")
    async def get_info(request: Request) -> dict[str, Any]:
        asked = await body(request, tt.GetInfoRequest)
        return await core(request).training.get_info(await caller(request), asked.model_id)

    @app.post("/api/v1/forward_backward")
    async def forward_backward(request: Request) -> dict[str, Any]:
        who = await caller(request)
        raw = await request.body()
        if request.headers.get("content-encoding", "").lower() == "zstd":
            raw = _unzstd(raw)
        if PROTOBUF not in request.headers.get("content-type", ""):
            raise HttpError(415, f"forward_backward takes a {PROTOBUF} body")
        return await core(request).training.forward_backward(who, tpb.ForwardBackwardRequest.FromString(raw))

    @app.post("/api/v1/optim_step")
    async def optim_step(request: Request) -> dict[str, Any]:
        return await core(request).training.optim_step(await caller(request), await body(request, tt.OptimStepRequest))

    @app.post("/api/v1/save_weights")
    async def save_weights(request: Request) -> dict[str, Any]:
        return await core(request).training.save_weights(await caller(request), await body(request, tt.SaveWeightsRequest))

    @app.post("/api/v1/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request) -> dict[str, Any]:
        asked = await body(request, tt.SaveWeightsForSamplerRequest)
        return await core(request).training.save_weights_for_sampler(await caller(request), asked)

    @app.post("/api/v1/load_weights")
    async def load_weights(request: Request) -> dict[str, Any]:
        return await core(request).training.load_weights(await caller(request), await body(request, tt.LoadWeightsRequest))


def _sampling(app: FastAPI) -> None:
    @app.post("/api/v1/create_sampling_session")
    async def create_sampling_session(request: Request) -> dict[str, Any]:
        asked = await body(request, tt.CreateSamplingSessionRequest)
        return await core(request).sampling.create_sampling_session(await caller(request), asked)

    @app.get("/api/v1/samplers/{sampler_id}")
    async def get_sampler(request: Request, sampler_id: str) -> dict[str, Any]:
        return await core(request).sampling.get_sampler(await caller(request), sampler_id)

    @app.post("/api/v1/asample")
    async def asample(request: Request) -> dict[str, Any]:
        return await core(request).sampling.asample(await caller(request), await body(request, tt.SampleRequest))

    @app.post("/api/v1/retrieve_future")
    async def retrieve_future(request: Request) -> Response:
        asked = await body(request, tt.FutureRetrieveRequest)
        result = await core(request).futures.retrieve(await caller(request), asked.request_id)
        if not isinstance(result, Message):
            return JSONResponse(result)
        if PROTOBUF in request.headers.get("accept", ""):
            return Response(result.SerializeToString(), media_type=PROTOBUF)
        if isinstance(result, tpb.SampleResponse):
            return JSONResponse(convert.sample_json(result))
        return JSONResponse(convert.forward_backward_json(result))


def _catalog(app: FastAPI) -> None:
    @app.get("/api/v1/training_runs")
    async def training_runs(request: Request, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        return await core(request).catalog.training_runs(await caller(request), _bounded(limit), max(offset, 0))

    @app.get("/api/v1/training_runs/{training_run_id}")
    async def training_run(request: Request, training_run_id: str) -> dict[str, Any]:
        return await core(request).catalog.training_run(await caller(request), training_run_id)

    @app.get("/api/v1/training_runs/{training_run_id}/checkpoints")
    async def run_checkpoints(request: Request, training_run_id: str) -> dict[str, Any]:
        return await core(request).catalog.checkpoints(await caller(request), training_run_id)

    @app.get("/api/v1/checkpoints")
    async def user_checkpoints(request: Request, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        return await core(request).catalog.user_checkpoints(await caller(request), _bounded(limit), max(offset, 0))

    @app.delete("/api/v1/training_runs/{training_run_id}/checkpoints/{kind}/{name}")
    async def delete_checkpoint(request: Request, training_run_id: str, kind: str, name: str) -> dict[str, Any]:
        await core(request).catalog.delete_checkpoint(await caller(request), training_run_id, kind, name)
        return {}

    @app.put("/api/v1/training_runs/{training_run_id}/checkpoints/{kind}/{name}/ttl")
    async def set_ttl(request: Request, training_run_id: str, kind: str, name: str) -> dict[str, Any]:
        asked = await body(request, _TtlBody)
        await core(request).catalog.set_ttl(await caller(request), training_run_id, kind, name, asked.ttl_seconds)
        return {}

    @app.post("/api/v1/weights_info")
    async def weights_info(request: Request) -> dict[str, Any]:
        asked = await body(request, _WeightsInfoBody)
        return await core(request).catalog.weights_info(await caller(request), asked.tinker_path)


class _TtlBody(pydantic.BaseModel):
    ttl_seconds: int | None = None


class _WeightsInfoBody(pydantic.BaseModel):
    tinker_path: str


def _bounded(limit: int) -> int:
    return min(max(limit, 1), 1000)


def _unzstd(raw: bytes) -> bytes:
    import zstandard  # the SDK's dependency; only for clients told to compress

    try:
        return zstandard.ZstdDecompressor().decompress(raw, max_output_size=MAX_BODY_BYTES)
    except zstandard.ZstdError as err:
        raise HttpError(400, f"invalid zstd body: {err}") from None
