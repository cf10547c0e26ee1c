"""ServiceClient: the connection, the session and its heartbeat, and run creation.

A ServiceClient runs everything in the background on one asyncio event loop, on one
daemon thread (`tunemesh.loop.LoopThread`): the grpc.aio channel, each TrainingClient's
ordered submit queue, one WatchOperations stream for all its operations, the heartbeat
and sampling calls. However many calls are pending, the client uses that one thread
(plus grpc's own).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import pathlib
import threading
import uuid
from typing import TYPE_CHECKING, Any

import grpc

from tunemesh import _wire, tokenizer
from tunemesh.checkpoints import CheckpointClient
from tunemesh.operations import OperationTracker
from tunemesh.retry import RetryPolicy
from tunemesh.sampling_client import SamplingClient
from tunemesh.training_client import TrainingClient
from tunemesh.transport import Transport, channel_credentials
from tunemesh.types import GetServerCapabilitiesResponse, LoraConfig
from tunemesh.v1 import sampling_pb2, sessions_pb2, training_pb2

if TYPE_CHECKING:
    from tunemesh.rest_client import RestClient

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:50051"
HEARTBEAT_INTERVAL_S = 10.0
_SESSION_GONE = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


class ServiceClient:
    """Entry point: `ServiceClient(address, api_key)`; use as a context manager or close().

    `address` defaults to $TUNEMESH_ADDRESS, `api_key` to $TUNEMESH_API_KEY. The
    session is created on first need and kept alive by a heartbeat every 10 s.
    `wait_timeout_s` is the hold of one WaitOperation long-poll, used only against a
    service without WatchOperations or over a caller-supplied synchronous `channel`.

    TLS: `ca_bundle` is the CAs to trust, a path to a PEM bundle (e.g. the
    `<state_dir>/tls/ca.pem` that `tunemesh up` writes) or the PEM bytes; it defaults to
    $TUNEMESH_CA_BUNDLE. `tls=True` connects over TLS (trusting `ca_bundle`, else the
    system roots); `tls=False` in plaintext, for a mesh run with --insecure (it ignores
    $TUNEMESH_CA_BUNDLE); the default, None, is TLS exactly when there is a CA bundle.
    The server's certificate must name the host dialled (for a list of replicas, the
    list's first host). ValueError, before anything is sent, for `tls=False` with a
    `ca_bundle`, for a bundle that cannot be read or is not PEM, and for `ca_bundle` or
    `tls` with a caller-supplied `channel` (whose credentials are the caller's).
    """

    def __init__(
        self,
        address: str | None = None,
        api_key: str | None = None,
        *,
        retry_policy: RetryPolicy | None = None,
        channel: grpc.Channel | None = None,
        heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
        tokenizer_cache_dir: str | os.PathLike[str] | None = None,
        wait_timeout_s: float = 30.0,
        ca_bundle: str | os.PathLike[str] | bytes | None = None,
        tls: bool | None = None,
    ) -> None:
        self.address = address or os.environ.get("TUNEMESH_ADDRESS") or DEFAULT_ADDRESS
        api_key = api_key if api_key is not None else os.environ.get("TUNEMESH_API_KEY")
        policy = retry_policy or RetryPolicy()
        if channel is None:
            source = ""
            if ca_bundle is None and tls is not False and os.environ.get("TUNEMESH_CA_BUNDLE"):
                ca_bundle, source = os.environ["TUNEMESH_CA_BUNDLE"], "$TUNEMESH_CA_BUNDLE"
            credentials = channel_credentials(ca_bundle, tls, source=source)
            self._transport = Transport.connect(self.address, api_key, policy, credentials)
        elif ca_bundle is not None or tls is not None:
            raise ValueError("ca_bundle and tls apply to the client's own channel, not to a caller-supplied one")
        else:
            self._transport = Transport(channel, api_key, policy)
        self._tracker = OperationTracker(self._transport, wait_timeout_s)
        self._heartbeat_interval_s = heartbeat_interval_s
        self._cache_root = (
            pathlib.Path(tokenizer_cache_dir)
            if tokenizer_cache_dir
            else tokenizer.default_cache_root()
        )
        self._lock = threading.Lock()
        self._session: str | None = None
        self._stop = threading.Event()
        self._heartbeat_task: concurrent.futures.Future | None = None
        self._training_clients: list[TrainingClient] = []
        self._tokenizer_lock = threading.Lock()
        self._tokenizers: dict[str, Any] = {}

    @property
    def session(self) -> str:
        """The session name, `sessions/{id}`; creates the session on first use."""
        with self._lock:
            if self._session is None:
                self._session = self._create_session()
            return self._session

    def get_server_capabilities(self) -> GetServerCapabilitiesResponse:
        """The base models served now and the per-request limits."""
        response = self._transport.call(
            self._transport.sessions.GetCapabilities,
            sessions_pb2.GetCapabilitiesRequest(),
            what="GetCapabilities",
        )
        return _wire.capabilities(response)

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        alpha: float | None = None,
        train_experts: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> TrainingClient:
        """Create a LoRA training run on `base_model` and return its client;
        `user_metadata` is kept with the run (`get_info().user_metadata`)."""
        config = LoraConfig(
            rank=rank, alpha=alpha, seed=seed, train_mlp=train_mlp, train_attn=train_attn,
            train_unembed=train_unembed, train_experts=train_experts,
        )
        request = training_pb2.CreateTrainingRunRequest(
            session=self.session,
            base_model=base_model,
            lora_config=_wire.lora_to_proto(config),
            request_id=str(uuid.uuid4()),
            user_metadata=user_metadata or {},
        )
        response = self._transport.call(
            self._transport.training.CreateTrainingRun, request, what="CreateTrainingRun"
        )
        return self._training_client(response.run.name, response.run.base_model or base_model)

    def create_checkpoint_client(self) -> CheckpointClient:
        """A client for the caller's checkpoints: list, get, delete, download, import."""
        return CheckpointClient(self._transport)

    def create_rest_client(self) -> RestClient:
        """A `tunemesh.RestClient` (Tinker's client for runs and checkpoints) sharing this
        client's connection."""
        from tunemesh.rest_client import RestClient  # it imports this module

        return RestClient(self._transport)

    def resume_training_client(self, run: str) -> TrainingClient:
        """A client for an existing run of the caller (`runs/{id}`), e.g. after this
        process or the whole mesh restarted: the run joins this client's session (a
        frozen run is rebuilt exactly from its automatic snapshot and log) and its calls
        continue after its last finished seq_id, so resume a run with no call still
        unfinished."""
        response = self._transport.call(
            self._transport.training.ResumeTrainingRun,
            training_pb2.ResumeTrainingRunRequest(name=run, session=self.session), what="ResumeTrainingRun",
        )
        return self._training_client(response.run.name, response.run.base_model, response.run.last_seq_id + 1)

    def create_training_client_from_state(self, path: str) -> TrainingClient:
        """A new run on the checkpoint's base model and LoRA config, with its weights
        loaded; the optimizer starts fresh (step 0)."""
        return self._create_from_checkpoint(path, with_optimizer=False)

    def create_training_client_from_state_with_optimizer(self, path: str) -> TrainingClient:
        """A new run that continues a state checkpoint exactly: weights, AdamW moments
        and step count."""
        return self._create_from_checkpoint(path, with_optimizer=True)

    def _create_from_checkpoint(self, path: str, with_optimizer: bool) -> TrainingClient:
        request = training_pb2.CreateTrainingRunRequest(
            session=self.session, from_checkpoint=path, load_optimizer_state=with_optimizer,
            request_id=str(uuid.uuid4()),
        )
        response = self._transport.call(
            self._transport.training.CreateTrainingRun, request, what="CreateTrainingRun"
        )
        return self._training_client(response.run.name, response.run.base_model)

    def create_sampling_client(
        self, base_model: str | None = None, model_path: str | None = None
    ) -> SamplingClient:
        """A client sampling `base_model`, or the checkpoint at `model_path` (its base
        model is the checkpoint's). It stays pinned to those weights."""
        request = sampling_pb2.CreateSamplingSessionRequest(
            session=self.session, base_model=base_model or "", model_path=model_path or ""
        )
        response = self._transport.call(
            self._transport.sampling.CreateSamplingSession, request, what="CreateSamplingSession"
        )
        session = response.sampling_session
        return SamplingClient(self._transport, session.name, session.base_model, session.model_path)

    def get_tokenizer(self, base_model: str) -> Any:
        """The tokenizer of `base_model`, fetched once per client and cached on disk."""
        with self._tokenizer_lock:
            if base_model not in self._tokenizers:
                response = self._transport.call(
                    self._transport.sessions.GetTokenizer,
                    sessions_pb2.GetTokenizerRequest(base_model=base_model),
                    what="GetTokenizer",
                )
                files = [(f.name, f.content) for f in response.files]
                directory = tokenizer.materialize(files, self._cache_root)
                self._tokenizers[base_model] = tokenizer.load(directory)
            return self._tokenizers[base_model]

    def close(self) -> None:
        """End the session, fail pending futures and close the channel. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._tracker.close()
        with self._lock:
            clients, session = list(self._training_clients), self._session
        for client in clients:
            client._close()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        if session is not None:
            self._end_session(session)
        self._transport.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _training_client(self, run: str, base_model: str, first_seq_id: int = 1) -> TrainingClient:
        client = TrainingClient(
            self._transport, self._tracker, run, base_model, self.get_tokenizer, self.create_sampling_client,
            first_seq_id=first_seq_id,
        )
        with self._lock:
            self._training_clients.append(client)
        return client

    def _create_session(self) -> str:
        if self._stop.is_set():
            raise RuntimeError("the ServiceClient is closed")
        request = sessions_pb2.CreateSessionRequest(labels={"client": "tunemesh-python"})
        response = self._transport.call(
            self._transport.sessions.CreateSession, request, what="CreateSession"
        )
        name = response.session.name
        self._heartbeat_task = self._transport.loop.submit(self._heartbeat(name))
        return name

    async def _heartbeat(self, session: str) -> None:
        """A task on the loop: one HeartbeatSession every interval until close."""
        request = sessions_pb2.HeartbeatSessionRequest(session=session)
        while not self._stop.is_set():
            await asyncio.sleep(self._heartbeat_interval_s)
            if self._stop.is_set():
                return
            try:
                await self._transport.invoke(self._transport.sessions.HeartbeatSession, request,
                                             timeout=self._heartbeat_interval_s)
            except grpc.RpcError as err:
                if self._stop.is_set():
                    return
                logger.warning("heartbeat of %s failed: %s", session, err.code())
                if err.code() in _SESSION_GONE:
                    return

    def _end_session(self, session: str) -> None:
        request = sessions_pb2.EndSessionRequest(session=session)
        try:
            self._transport.loop.run(self._transport.invoke(self._transport.sessions.EndSession, request, timeout=5.0))
        except grpc.RpcError as err:
            logger.warning("ending %s failed: %s", session, err.code())
