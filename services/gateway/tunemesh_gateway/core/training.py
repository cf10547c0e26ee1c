"""Training models: create (also from a checkpoint), describe, and the ordered calls
(forward_backward, optim_step, saves, load) that become tunemesh Operations.

Every ordered call keeps the SDK's `seq_id` and is sent with request id
`{model_id}#{seq_id}`: the SDK re-sends one (model, seq_id) with the same payload, so the
scheduler answers a retry with the same Operation.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from tinker import types as tt
from tinker.proto import tinker_public_pb2 as tpb

from tunemesh import tensors
from tunemesh.errors import InvalidArgumentError, TunemeshError
from tunemesh.v1 import training_pb2, types_pb2

from tunemesh_gateway import convert
from tunemesh_gateway.core.futures import CREATE, LOAD, OP, FutureRef, LocalFutures
from tunemesh_gateway.core.names import Names
from tunemesh_gateway.core.ports import Caller, GatewayStore, Upstream
from tunemesh_gateway.status import HttpError, Unsupported, http_status

log = logging.getLogger(__name__)


SEQ_SPENDING = frozenset({400, 403, 404, 409, 410, 413, 422})  # refusals the SDK does not retry (not 401, 429, 5xx)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    call_timeout_s: float = 30.0
    create_timeout_s: float = 900.0
    unnamed_sampler_ttl_s: int = 86400


class TrainingCore:
    def __init__(self, upstream: Upstream, store: GatewayStore, names: Names, futures: LocalFutures,
                 config: TrainingConfig) -> None:
        self._up, self._store, self._names, self._futures, self._config = upstream, store, names, futures, config

    # -- models ------------------------------------------------------------------------

    async def create_model(self, caller: Caller, request: tt.CreateModelRequest) -> dict[str, Any]:
        """CreateTrainingRun in the background as `{session}:train:{n}` (also its request id)."""
        convert.check_optimizer(request.optimizer_config)
        model = convert.model_id(request.session_id, request.model_seq_id)
        call = training_pb2.CreateTrainingRunRequest(
            session=convert.session_name(request.session_id), base_model=request.base_model,
            lora_config=convert.lora_config(request.lora_config), request_id=model,
            user_metadata=convert.run_labels(request.user_metadata, model))
        return self._create(caller, FutureRef(CREATE, model), call, {"type": "create_model", "model_id": model})

    async def load_weights(self, caller: Caller, request: tt.LoadWeightsRequest) -> dict[str, Any]:
        """Create-via-load (`session_id`, `model_seq_id`): a run made from the checkpoint;
        legacy (`model_id`, `seq_id`): LoadState into the model."""
        if request.session_id is None or request.model_seq_id is None:
            return await self._load_state(caller, request)
        _check_load(request)
        model = convert.model_id(request.session_id, request.model_seq_id)
        call = training_pb2.CreateTrainingRunRequest(
            session=convert.session_name(request.session_id), base_model=request.base_model or "",
            request_id=model, from_checkpoint=await self._names.tunemesh_path(caller, request.path),
            load_optimizer_state=request.optimizer, user_metadata=convert.run_labels(request.user_metadata, model))
        result = {"type": "load_weights", "model_id": model, "path": request.path}
        return self._create(caller, FutureRef(LOAD, model), call, result)

    async def _load_state(self, caller: Caller, request: tt.LoadWeightsRequest) -> dict[str, Any]:
        if request.model_id is None or request.seq_id is None:
            raise InvalidArgumentError("BAD_REQUEST",
                                       "load_weights takes (session_id, model_seq_id) or (model_id, seq_id)")
        seq = request.seq_id

        async def build(run: str) -> training_pb2.LoadStateRequest:
            _check_load(request)
            return training_pb2.LoadStateRequest(
                run=run, seq_id=seq, path=await self._names.tunemesh_path(caller, request.path),
                request_id=convert.training_request_id(request.model_id, seq), load_optimizer_state=request.optimizer)

        return await self._ordered(caller, request.model_id, seq, self._up.training.LoadState, build)

    def _create(self, caller: Caller, ref: FutureRef, call: training_pb2.CreateTrainingRunRequest,
                result: dict[str, Any]) -> dict[str, Any]:
        model = ref.key

        async def create() -> dict[str, Any]:
            response = await self._up.call(caller, self._up.training.CreateTrainingRun, call,
                                           self._config.create_timeout_s)
            await self._store.put_model(model, response.run.name)
            return result

        request_id = ref.encode()
        self._futures.start(request_id, caller.owner, ref.kind, create)
        return {"request_id": request_id, "model_id": model}

    async def get_info(self, caller: Caller, model: str) -> dict[str, Any]:
        run = await self._get_run(caller, model)
        return convert.get_info(run, model)

    async def _get_run(self, caller: Caller, model: str) -> training_pb2.TrainingRun:
        request = training_pb2.GetTrainingRunRequest(name=await self._names.run(caller, model))
        return (await self._up.call(caller, self._up.training.GetTrainingRun, request, self._config.call_timeout_s)).run

    # -- ordered calls -----------------------------------------------------------------

    async def forward_backward(self, caller: Caller, request: tpb.ForwardBackwardRequest) -> dict[str, Any]:
        """Forward when `forward_only`, else ForwardBackward."""
        method = self._up.training.Forward if request.forward_only else self._up.training.ForwardBackward
        return await self._ordered(caller, request.model_id, request.seq_id, method,
                                   lambda run: convert.data_call(request, run))

    async def optim_step(self, caller: Caller, request: tt.OptimStepRequest) -> dict[str, Any]:
        seq = _seq(request.seq_id)
        return await self._ordered(caller, request.model_id, seq, self._up.training.OptimStep, lambda run: (
            training_pb2.OptimStepRequest(run=run, seq_id=seq, adam_params=convert.adam_params(request.optim_params),
                                          request_id=convert.training_request_id(request.model_id, seq))))

    async def save_weights(self, caller: Caller, request: tt.SaveWeightsRequest) -> dict[str, Any]:
        """SaveState: weights and optimizer state, `tinker://{model}/weights/{name}`."""
        seq = _seq(request.seq_id)

        def build(run: str) -> training_pb2.SaveStateRequest:
            if request.overwrite:
                raise Unsupported("overwrite=true (checkpoint names are immutable in tunemesh)")
            return training_pb2.SaveStateRequest(
                run=run, seq_id=seq, name=request.path or "", ttl_seconds=request.ttl_seconds or 0,
                request_id=convert.training_request_id(request.model_id, seq),
                user_metadata=request.user_metadata or {})

        return await self._ordered(caller, request.model_id, seq, self._up.training.SaveState, build)

    async def save_weights_for_sampler(self, caller: Caller,
                                       request: tt.SaveWeightsForSamplerRequest) -> dict[str, Any]:
        """Named: `tinker://{model}/sampler_weights/{name}`. Unnamed: an `auto-N` checkpoint
        (with the gateway's TTL) and then a sampling session on it, made once per
        (session, sampling_session_seq_id). `inflight` is served as a snapshot."""
        seq, named = _seq(request.seq_id), request.path is not None
        ttl = request.ttl_seconds or (0 if named else self._config.unnamed_sampler_ttl_s)
        session = "" if named else await self._session_of(caller, request.model_id)

        def build(run: str) -> training_pb2.SaveWeightsForSamplerRequest:
            if not named and request.sampling_session_seq_id is None:
                raise InvalidArgumentError("BAD_REQUEST",
                                           "save_weights_for_sampler needs a path or a sampling_session_seq_id")
            return training_pb2.SaveWeightsForSamplerRequest(
                run=run, seq_id=seq, name=request.path or "", ttl_seconds=ttl,
                request_id=convert.training_request_id(request.model_id, seq),
                user_metadata=request.user_metadata or {})

        sampler_seq = -1 if named else (request.sampling_session_seq_id or 0)
        return await self._ordered(caller, request.model_id, seq, self._up.training.SaveWeightsForSampler, build,
                                   session, sampler_seq)

    async def _session_of(self, caller: Caller, model: str) -> str:
        """The Tinker session a model belongs to: in its id, else the run's."""
        session, sep, _ = model.rpartition(":train:")
        return session if sep else convert.session_id_of((await self._get_run(caller, model)).session)

    async def _ordered(self, caller: Caller, model: str, seq: int, method: Any, build: Callable[[str], Any],
                       session: str = "", sampler_seq: int = -1) -> dict[str, Any]:
        """Queue the ordered call `build(run)`. One refused (a 4xx the SDK does not retry)
        still used up its seq_id in the SDK, which never sends it again: a no-op takes its
        place, or the model's later calls would wait on the gap until the scheduler fails them."""
        run = await self._names.run(caller, model)
        try:
            call = build(run)
            if inspect.isawaitable(call):
                call = await call
            response = await self._up.call(caller, method, call, self._config.call_timeout_s)
        except (TunemeshError, HttpError) as err:
            status = err.status if isinstance(err, HttpError) else http_status(err)
            if status in SEQ_SPENDING and getattr(err, "reason", "") != "RUN_NOT_FOUND":  # no run: no gap
                await self._fill(caller, run, model, seq)
            raise
        ref = FutureRef(OP, response.operation.name, model=model, session=session, seq=sampler_seq, order=seq)
        return {"request_id": ref.encode(), "model_id": model}

    async def fill_lost(self, caller: Caller, model: str, seq: int) -> None:
        """A call the service lost after accepting it (its operation is unknown now): the
        SDK raises its failure and never re-sends it, so a no-op takes its seq_id."""
        await self._fill(caller, await self._names.run(caller, model), model, seq)

    async def _fill(self, caller: Caller, run: str, model: str, seq: int) -> None:
        """A forward of one token 0 with weight 0 at `seq`: no gradient, no state changed."""
        datum = types_pb2.Datum(loss_fn_inputs={"target_tokens": tensors.encode(np.zeros(1, np.int64)),
                                                "weights": tensors.encode(np.zeros(1, np.float32))})
        datum.model_input.chunks.add().encoded_text.tokens.append(0)
        call = training_pb2.ForwardRequest(run=run, seq_id=seq, data=[datum], loss_fn="cross_entropy",
                                           request_id=convert.training_request_id(model, seq) + "#refused")
        try:
            await self._up.call(caller, self._up.training.Forward, call, self._config.call_timeout_s)
        except TunemeshError as err:
            log.warning("run %s: seq_id %d was refused and stays a gap: %s", run, seq, err)
        else:
            log.info("run %s: seq_id %d was refused; a no-op forward holds its place", run, seq)


def _seq(seq_id: int | None) -> int:
    if seq_id is None:
        raise InvalidArgumentError("BAD_SEQ_ID", "ordered training calls carry a seq_id (from 1)")
    return seq_id


def _check_load(request: tt.LoadWeightsRequest) -> None:
    if request.weights_access_token:
        raise Unsupported("weights_access_token (checkpoints are read by their owner only)")
    if request.optimizer_config is not None:
        convert.check_optimizer(request.optimizer_config)
