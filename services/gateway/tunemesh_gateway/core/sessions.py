"""Client configuration, sessions and server capabilities."""

from __future__ import annotations

import logging
from typing import Any

from tinker import types as tt

from tunemesh.errors import Code, TunemeshError
from tunemesh.v1 import sessions_pb2

from tunemesh_gateway import convert
from tunemesh_gateway.core.ports import Caller, Upstream
from tunemesh_gateway.status import Gone

log = logging.getLogger(__name__)

DEFAULT_LIMITS = sessions_pb2.RequestLimits(max_datums=1024, max_tokens=262144)
BYTES_PER_TOKEN = 15  # the SDK's estimate per token of a datum: int32 token, int64 target, float32 weight
DYNAMIC_CONFIG = {"refresh_interval_sec": 300, "sample_cancel_enabled": False, "sample_cancel_max_batch_size": 64}


class SessionCore:
    def __init__(self, upstream: Upstream, max_chunk_bytes: int, timeout_s: float) -> None:
        self._up, self._max_chunk_bytes, self._timeout_s = upstream, max_chunk_bytes, timeout_s

    async def client_config(self, caller: Caller) -> dict[str, Any]:
        """Flags for the SDK: plain httpx, API keys, uncompressed protobuf, forward_backward
        chunks within the scheduler's request limits."""
        limits = DEFAULT_LIMITS
        try:
            limits = (await self._capabilities(caller)).limits
        except TunemeshError as err:  # the SDK cannot start without this answer: fall back to the defaults
            log.warning("client/config: scheduler limits unavailable (%s); defaults sent", err)
        return {"use_pyqwest_transport": False, "pjwt_auth_enabled": False, "proto_compress_fwdbwd": False,
                "parallel_fwdbwd_chunks": True, "fwdbwd_max_chunk_len": int(limits.max_datums),
                "fwdbwd_max_chunk_bytes_count": min(self._max_chunk_bytes, int(limits.max_tokens) * BYTES_PER_TOKEN),
                "sample_use_retrieve_futures": False, "custom_loss_server_side": False,
                "sample_join_sampling_session": False}

    @staticmethod
    def dynamic_config() -> dict[str, Any]:
        return dict(DYNAMIC_CONFIG)

    async def capabilities(self, caller: Caller) -> dict[str, Any]:
        models = (await self._capabilities(caller)).models
        return {"supported_models": [{"model_name": m.name, "max_context_length": int(m.max_seq_len),
                                      "trainable": True, "sampleable": True} for m in models]}

    async def _capabilities(self, caller: Caller) -> sessions_pb2.GetCapabilitiesResponse:
        return await self._up.call(caller, self._up.sessions.GetCapabilities, sessions_pb2.GetCapabilitiesRequest(),
                                   self._timeout_s)

    async def create_session(self, caller: Caller, request: tt.CreateSessionRequest) -> dict[str, Any]:
        """A tunemesh session labelled with the SDK's tags, metadata and names."""
        labels = convert.labels(request.user_metadata)
        extra = {"tinker.sdk_version": request.sdk_version, "tinker.tags": ",".join(request.tags),
                 "tinker.project_id": request.project_id or "", "tinker.display_name": request.display_name or ""}
        labels.update({k: v for k, v in extra.items() if v})
        response = await self._up.call(caller, self._up.sessions.CreateSession,
                                       sessions_pb2.CreateSessionRequest(labels=labels), self._timeout_s)
        return {"type": "create_session", "session_id": convert.session_id_of(response.session.name)}

    async def heartbeat(self, caller: Caller, session_id: str) -> dict[str, Any]:
        """410 once the session is gone or ended: the SDK stops heart-beating."""
        request = sessions_pb2.HeartbeatSessionRequest(session=convert.session_name(session_id))
        try:
            await self._up.call(caller, self._up.sessions.HeartbeatSession, request, self._timeout_s)
        except TunemeshError as err:
            if err.rpc_code in (Code.NOT_FOUND, Code.FAILED_PRECONDITION):
                raise Gone(f"session {session_id!r} has ended or is unknown") from err
            raise
        return {"type": "session_heartbeat"}

    async def finish(self, caller: Caller, session_id: str) -> dict[str, Any]:
        """End the session (its runs freeze and free their adapter slots); an unknown one is fine."""
        request = sessions_pb2.EndSessionRequest(session=convert.session_name(session_id))
        try:
            await self._up.call(caller, self._up.sessions.EndSession, request, self._timeout_s)
        except TunemeshError as err:
            if err.rpc_code != Code.NOT_FOUND:
                raise
        return {}
