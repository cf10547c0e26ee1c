"""TrainingClient: ordered, pipelined calls on one LoRA training run."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from tunemesh import _wire, custom_loss
from tunemesh.custom_loss import CustomLossFn
from tunemesh.errors import TunemeshError
from tunemesh.futures import APIFuture
from tunemesh.operations import OperationTracker, SubmitLane
from tunemesh.transport import Transport
from tunemesh.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoadWeightsResponse,
    OptimStepResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
)
from tunemesh.v1 import training_pb2

logger = logging.getLogger(__name__)

LossFnConfig = Mapping[str, float | str] | None

REJECTED_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
"""Submit failures after which the service holds no trace of the call: it validated and
refused it, or it was never sent (INVALID_ARGUMENT [REQUEST_TOO_LARGE], see errors.py)."""
SEQ_ID_TAKEN_REASONS = frozenset({"SEQ_ID_PASSED", "SEQ_ID_REUSED"})
"""Rejections meaning the run is past the seq_id or holds another call there: handing
that seq_id to the next call would only fail it too."""
TRANSPORT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)
"""Failures on the way to or from the service (down, overloaded, cut off): a submit in
doubt stays in doubt through any number of them."""
EPHEMERAL_SAMPLER_TTL_S = 3600
"""How long the weights of an unnamed `save_weights_and_get_sampling_client()` live:
ephemeral, as Tinker's are ("checkpoints are always ephemeral"), for an hour (Tinker's
shortest TTL), so a loop saving every step does not fill the tenant's storage quota."""
MAX_UNCLEAR_ANSWERS = 3
"""Other non-definitive answers (INTERNAL, UNKNOWN, ...) a submit in doubt may get, its
first send included, before it is given up and its seq_id goes to the next call (if the
service does hold it, that call is told SEQ_ID_REUSED and the one after goes on)."""


@dataclasses.dataclass(frozen=True)
class _InDoubt:
    """A submit whose outcome is unknown: the service may or may not hold it."""

    method: Any
    request: Any
    unclear_answers: int


class TrainingClient:
    """Trains one run. Each call returns a future at once and is sent in call order.

    Calls may be pipelined (submit forward_backward, optim_step and the next
    forward_backward before waiting): the service executes them in seq_id order.
    Retries reuse the call's request_id and seq_id, so each call executes once, and
    no seq_id is ever skipped, so the run never stalls on a gap: see `_start`.
    """

    def __init__(
        self,
        transport: Transport,
        tracker: OperationTracker,
        run: str,
        base_model: str,
        tokenizer_for: Callable[[str], Any] | None = None,
        sampling_client_for: Callable[..., Any] | None = None,
        first_seq_id: int = 1,
    ) -> None:
        self._sampling_client_for = sampling_client_for
        self._transport = transport
        self._tracker = tracker
        self._run = run
        self._base_model = base_model
        self._tokenizer_for = tokenizer_for
        self._lane = SubmitLane(transport.loop, name=f"tunemesh-submit-{run}")
        self._next_seq_id = first_seq_id  # touched only by the lane's task
        self._in_doubt: _InDoubt | None = None  # touched only by the lane's task

    @property
    def run(self) -> str:
        """The run's resource name, `runs/{id}`."""
        return self._run

    model_id = run

    @property
    def base_model(self) -> str:
        return self._base_model

    def forward(
        self, data: Sequence[Datum], loss_fn: str = "cross_entropy",
        loss_fn_config: LossFnConfig = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Score `data` with `loss_fn`: outputs and metrics, no gradients."""
        return self._forward_like(
            training_pb2.ForwardRequest, self._transport.training.Forward,
            data, loss_fn, loss_fn_config,
        )

    def forward_backward(
        self, data: Sequence[Datum], loss_fn: str = "cross_entropy",
        loss_fn_config: LossFnConfig = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Forward and backward pass; gradients accumulate until optim_step."""
        return self._forward_like(
            training_pb2.ForwardBackwardRequest, self._transport.training.ForwardBackward,
            data, loss_fn, loss_fn_config,
        )

    def forward_backward_custom(self, data: Sequence[Datum], loss_fn: CustomLossFn) -> APIFuture[ForwardBackwardOutput]:
        """Train on a loss written in torch and computed on this machine.

        A forward returns the learner's target logprobs; `loss_fn(data, logprobs)` (one
        tensor per datum, shaped like its target_tokens) returns `(loss, metrics)`; its
        gradient -dloss/dlogprobs is sent as the weights of a cross_entropy
        forward_backward, whose gradient then equals the custom loss's. The two calls
        take consecutive places in this run's order, so no other call of this client
        runs between them. Metrics: `loss:sum` is the custom loss, `surrogate_loss:sum`
        the service's, plus `loss_fn`'s own. Needs torch.
        """
        datums = [d if isinstance(d, Datum) else _not_a_datum(d) for d in data]
        result: dict[str, Any] = {}
        training = self._transport.training

        async def submit():
            probe = _wire.forward_request(training_pb2.ForwardRequest, self._run, 0, str(uuid.uuid4()),
                                          custom_loss.probe_data(datums), "cross_entropy", None)
            forward = await self._tracker.submit_and_wait(lambda: self._stamped_send(training.Forward, probe),
                                                          resend=lambda: self._resend(training.Forward, probe))
            error = _wire.operation_error(forward)
            if error is not None:
                raise error
            # The user's loss runs off the loop (it may be slow, or call the SDK itself).
            weights, result["loss"], result["metrics"] = await asyncio.to_thread(
                custom_loss.surrogate_weights, datums, _wire.forward_backward_output(forward), loss_fn)
            result["request"] = _wire.forward_request(
                training_pb2.ForwardBackwardRequest, self._run, 0, str(uuid.uuid4()),
                custom_loss.surrogate_data(datums, weights), "cross_entropy", None)
            return await self._stamped_send(training.ForwardBackward, result["request"])

        def convert(operation):
            surrogate = _wire.forward_backward_output(operation)
            return custom_loss.custom_output(surrogate, result["loss"], result["metrics"])

        def resend():
            return self._resend(training.ForwardBackward, result["request"])

        return self._tracker.start(self._lane, submit, convert, resend)

    def optim_step(self, adam_params: AdamParams | None = None) -> APIFuture[OptimStepResponse]:
        """Apply one AdamW step to the run's adapter and clear its gradients."""
        request = _wire.optim_step_request(self._run, 0, "", adam_params or AdamParams())
        return self._start(self._transport.training.OptimStep, request, _wire.optim_step_output)

    def save_state(
        self, name: str, *, ttl_seconds: int | None = None, user_metadata: Mapping[str, str] | None = None,
    ) -> APIFuture[SaveWeightsResponse]:
        """Save weights and optimizer state as `tunemesh://runs/{run}/state/{name}`.

        Ordered with the run's other calls: it holds exactly the updates of the calls
        made before it. Names are immutable (a second save to a name fails
        ALREADY_EXISTS); `ttl_seconds` makes it expire (default: never)."""
        request = training_pb2.SaveStateRequest(
            run=self._run, name=name, ttl_seconds=ttl_seconds or 0, user_metadata=dict(user_metadata or {})
        )
        return self._start(
            self._transport.training.SaveState, request, lambda op: _wire.save_output(op, SaveWeightsResponse)
        )

    def save_weights_for_sampler(
        self, name: str | None = None, *, ttl_seconds: int | None = None,
        user_metadata: Mapping[str, str] | None = None,
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Save the weights alone as `tunemesh://runs/{run}/sampler/{name}`; without a
        name the service picks a fresh version, `auto-{seq_id}`."""
        request = training_pb2.SaveWeightsForSamplerRequest(
            run=self._run, name=name or "", ttl_seconds=ttl_seconds or 0, user_metadata=dict(user_metadata or {})
        )
        return self._start(
            self._transport.training.SaveWeightsForSampler, request,
            lambda op: _wire.save_output(op, SaveWeightsForSamplerResponse),
        )

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> Any:
        """Save the weights as a fresh sampler checkpoint (after every call made before
        this one) and return a SamplingClient pinned to it.

        Without a name the checkpoint is ephemeral: it expires `EPHEMERAL_SAMPLER_TTL_S`
        (1 h) after the save, as Tinker's unnamed sampler weights do, so RL or distill
        loops that make a sampling client every step leave nothing behind for long. A
        client must not be used past that hour (make a new one, or name the save). A
        named save never expires (`save_weights_for_sampler(name, ttl_seconds=...)` or
        `CheckpointClient.set_ttl` give it one)."""
        if self._sampling_client_for is None:
            raise RuntimeError("this TrainingClient has no sampling client source")
        ttl_seconds = None if name else EPHEMERAL_SAMPLER_TTL_S
        saved = self.save_weights_for_sampler(name, ttl_seconds=ttl_seconds).result()
        return self._sampling_client_for(model_path=saved.path)

    def load_state(self, path: str) -> APIFuture[LoadWeightsResponse]:
        """Load a checkpoint's weights into this run; the optimizer restarts (step 0)."""
        return self._load(path, with_optimizer=False)

    def load_state_with_optimizer(self, path: str) -> APIFuture[LoadWeightsResponse]:
        """Load a state checkpoint's weights, AdamW moments and step count: training
        then continues exactly as the saved run would have."""
        return self._load(path, with_optimizer=True)

    def _load(self, path: str, with_optimizer: bool) -> APIFuture[LoadWeightsResponse]:
        request = training_pb2.LoadStateRequest(run=self._run, path=path, load_optimizer_state=with_optimizer)
        return self._start(self._transport.training.LoadState, request, _wire.load_output)

    # Tinker-style async spellings: `await` gives the future (the call is queued), a
    # second `await` gives the result, so cookbook code ports unchanged.

    async def forward_async(self, *args: Any, **kwargs: Any) -> APIFuture[ForwardBackwardOutput]:
        return self.forward(*args, **kwargs)

    async def forward_backward_async(
        self, *args: Any, **kwargs: Any
    ) -> APIFuture[ForwardBackwardOutput]:
        return self.forward_backward(*args, **kwargs)

    async def forward_backward_custom_async(
        self, data: Sequence[Datum], loss_fn: CustomLossFn
    ) -> APIFuture[ForwardBackwardOutput]:
        return self.forward_backward_custom(data, loss_fn)

    async def optim_step_async(self, *args: Any, **kwargs: Any) -> APIFuture[OptimStepResponse]:
        return self.optim_step(*args, **kwargs)

    async def save_state_async(self, *args: Any, **kwargs: Any) -> APIFuture[SaveWeightsResponse]:
        return self.save_state(*args, **kwargs)

    async def save_weights_for_sampler_async(
        self, *args: Any, **kwargs: Any
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        return self.save_weights_for_sampler(*args, **kwargs)

    async def load_state_async(self, path: str) -> APIFuture[LoadWeightsResponse]:
        return self.load_state(path)

    async def load_state_with_optimizer_async(self, path: str) -> APIFuture[LoadWeightsResponse]:
        return self.load_state_with_optimizer(path)

    def get_info(self) -> GetInfoResponse:
        """The run as the service reports it (base model, LoRA config, step)."""
        response = self._transport.call(
            self._transport.training.GetTrainingRun,
            training_pb2.GetTrainingRunRequest(name=self._run),
            what="GetTrainingRun",
        )
        return _wire.run_info(response.run)

    def delete(self) -> None:
        """Delete the run and free its adapter slot on the service. Wait for (or cancel)
        its pending calls first: a run with unfinished operations answers RUN_BUSY."""
        self._transport.call(
            self._transport.training.DeleteTrainingRun,
            training_pb2.DeleteTrainingRunRequest(name=self._run),
            what="DeleteTrainingRun",
        )

    def get_tokenizer(self) -> Any:
        """The base model's tokenizer, fetched from the service and cached on disk."""
        if self._tokenizer_for is None:
            raise RuntimeError("this TrainingClient has no tokenizer source")
        return self._tokenizer_for(self._base_model)

    def _forward_like(
        self, request_cls: type, method: Any, data: Sequence[Datum], loss_fn: str,
        loss_fn_config: LossFnConfig,
    ) -> APIFuture[ForwardBackwardOutput]:
        datums = [d if isinstance(d, Datum) else _not_a_datum(d) for d in data]
        request = _wire.forward_request(
            request_cls, self._run, 0, "", datums, loss_fn, loss_fn_config
        )
        return self._start(method, request, _wire.forward_backward_output)

    def _start(self, method: Any, request: Any, convert: Callable) -> APIFuture[Any]:
        """Queue the submission in call order; it is stamped with the next seq_id on send.

        The lane sends one call at a time in call order, so seq_ids follow call order,
        and a seq_id goes to the next call unless the service may hold its call:

        - accepted (an operation came back): used.
        - definitively rejected (REJECTED_CODES, including a request too large to send,
          refused before anything is sent): the service holds no trace, so the seq_id
          goes to the next call; nothing is re-sent.
        - SEQ_ID_PASSED or SEQ_ID_REUSED: the run is past that seq_id, so it is used.
        - anything else (retries ran out on UNAVAILABLE, INTERNAL, UNKNOWN, ...): in
          doubt. Its future fails with that error, and before the next call the lane
          re-sends it unchanged (same request_id and seq_id): the service returns the
          operation it holds or queues it now, so no gap can form. Until it settles,
          each later call fails with the re-send's error; after MAX_UNCLEAR_ANSWERS
          answers other than transport failures it is given up (its seq_id is free).

        If the service later loses the queued operation (a scheduler restart), the
        future's waiter re-sends the request unchanged too (OperationTracker._settled).
        """
        request.request_id = str(uuid.uuid4())
        return self._tracker.start(self._lane, lambda: self._stamped_send(method, request), convert,
                                   lambda: self._resend(method, request))

    async def _stamped_send(self, method: Any, request: Any):
        """On the lane: settle an in-doubt submit, stamp the next seq_id, send. The
        service acknowledges it once queued (`ack_when_queued`), before its state store
        has it: this client keeps every call until its result and re-sends one whose
        operation was lost (`_resend`), so the next call goes out without waiting on etcd."""
        await self._settle_in_doubt()
        request.seq_id = self._next_seq_id
        request.ack_when_queued = True
        return await self._send(method, request)

    async def _send(self, method: Any, request: Any):
        """On the lane: send one stamped submit; record its seq_id's fate (see `_start`)."""
        what = f"{type(request).__name__}(seq_id={request.seq_id})"
        try:
            operation = (await self._transport.call_async(method, request, what=what)).operation
        except TunemeshError as err:
            if err.reason in SEQ_ID_TAKEN_REASONS:
                self._in_doubt = None
                self._next_seq_id = request.seq_id + 1
            elif err.code in REJECTED_CODES:
                self._in_doubt = None  # the service never queued it: its seq_id is free
            else:
                self._keep_in_doubt(method, request, err)
            raise
        self._in_doubt = None
        self._next_seq_id = request.seq_id + 1
        return operation

    def _keep_in_doubt(self, method: Any, request: Any, err: TunemeshError) -> None:
        """Keep a submit that `err` leaves unknown to re-send before the next call, or give
        it up after MAX_UNCLEAR_ANSWERS answers other than transport failures."""
        earlier = self._in_doubt
        unclear = earlier.unclear_answers if earlier is not None and earlier.request is request else 0
        if err.code not in TRANSPORT_CODES:
            unclear += 1
        if unclear < MAX_UNCLEAR_ANSWERS:
            self._in_doubt = _InDoubt(method, request, unclear)
            return
        logger.warning("%s of %s failed %d times (last: %s); its seq_id %d goes to the next call",
                       type(request).__name__, self._run, unclear, err, request.seq_id)
        self._in_doubt = None

    async def _settle_in_doubt(self) -> None:
        """Re-send a submit whose outcome is unknown; raise its error if it stays unknown."""
        if self._in_doubt is None:
            return
        try:
            await self._send(self._in_doubt.method, self._in_doubt.request)
        except TunemeshError:
            if self._in_doubt is not None:
                raise  # this call fails; the next one tries to settle it again
            # else settled: rejected (its seq_id is free), passed, or given up

    async def _resend(self, method: Any, request: Any):
        """Send an accepted submit again, unchanged (its operation was lost); on the loop."""
        what = f"{type(request).__name__}(seq_id={request.seq_id}, re-sent)"
        return (await self._transport.call_async(method, request, what=what)).operation

    def _close(self) -> None:
        self._lane.close()

    def __repr__(self) -> str:
        return f"TrainingClient(run={self._run!r}, base_model={self._base_model!r})"


def _not_a_datum(value: Any) -> Datum:
    raise TypeError(f"expected tunemesh.Datum, got {type(value).__name__}")
