"""`retrieve_future`: hold the poll until the work is done or `poll_wait_s` passes
(then `try_again`: the SDK polls again at once), and answer in Tinker's result types.

A failure is a 200 `{"error", "category"}` (the SDK raises RequestFailedError), except a
future the gateway no longer knows or a sample that met a full or unreachable mesh: 410
(the SDK submits a sample again; any other 410 it raises). A training call the scheduler
no longer knows fails OPERATION_LOST, and a no-op takes its seq_id so that the model's
later calls are not held behind it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from tunemesh.errors import Code, NotFoundError, TunemeshError
from tunemesh.v1 import checkpoints_pb2, operations_pb2, training_pb2

from tunemesh_gateway import convert
from tunemesh_gateway.core.futures import CREATE, LOAD, OP, SAMPLE, FutureRef, LocalFutures, Unknown
from tunemesh_gateway.core.names import Names
from tunemesh_gateway.core.ports import Caller, Upstream
from tunemesh_gateway.core.sampling import SamplingCore
from tunemesh_gateway.status import Gone, HttpError, detail, failed_future

log = logging.getLogger(__name__)

RESUBMIT_CODES = frozenset({Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED})
"""A sample that failed with these is answered 410: the SDK sends it again (it backs off first)."""
Result = dict[str, Any] | Message  # JSON, or a Tinker protobuf (ForwardBackwardOutput, SampleResponse)
FillLost = Callable[[Caller, str, int], Awaitable[None]]  # (caller, model id, seq_id)


class FutureCore:
    def __init__(self, upstream: Upstream, names: Names, futures: LocalFutures, sampling: SamplingCore,
                 poll_wait_s: float, fill_lost: FillLost | None = None) -> None:
        self._up, self._names, self._futures, self._sampling = upstream, names, futures, sampling
        self._wait_s = poll_wait_s
        self._fill_lost = fill_lost

    async def retrieve(self, caller: Caller, request_id: str) -> Result:
        try:
            ref = FutureRef.decode(request_id)
        except ValueError:
            raise HttpError(404, f"unknown request_id {request_id[:140]!r}") from None
        if ref.kind == OP:
            return await self._operation(caller, ref, request_id)
        try:
            done, result = await self._futures.wait(request_id, caller.owner, self._wait_s)
        except Unknown:
            if ref.kind in (CREATE, LOAD) and await self._made(caller, ref.key):  # made before a restart
                return {"type": "create_model" if ref.kind == CREATE else "load_weights", "model_id": ref.key}
            raise Gone(f"request {request_id[:140]!r} is unknown or expired; submit it again") from None
        except TunemeshError as err:
            if ref.kind == SAMPLE and err.rpc_code in RESUBMIT_CODES:
                self._futures.forget(request_id, caller.owner)
                raise Gone(f"sample not run ({detail(err)}); submit it again") from err
            return failed_future(int(err.rpc_code), err.reason, err.message)
        except Exception:  # a bug here must fail this future, not the gateway
            log.exception("background %s %s failed", ref.kind, ref.key)
            return failed_future(int(Code.INTERNAL), "GATEWAY_ERROR", "the gateway failed; see its log")
        return result if done else try_again(request_id)

    async def _made(self, caller: Caller, model: str) -> bool:
        """Whether the caller has the run of `model` (the scheduler says whose it is)."""
        try:
            request = training_pb2.GetTrainingRunRequest(name=await self._names.run(caller, model))
            await self._up.call(caller, self._up.training.GetTrainingRun, request, self._wait_s)
        except NotFoundError:
            return False
        return True

    async def _operation(self, caller: Caller, ref: FutureRef, request_id: str) -> Result:
        request = operations_pb2.WaitOperationRequest(name=ref.key, timeout=Duration(seconds=int(self._wait_s)))
        try:
            response = await self._up.call(caller, self._up.operations.WaitOperation, request, self._wait_s + 15)
        except TunemeshError as err:
            if err.rpc_code != Code.NOT_FOUND:
                raise
            if ref.order < 1 or self._fill_lost is None:
                raise Gone(f"operation {ref.key!r} is unknown or expired") from err
            # The official SDK re-sends only samples on 410: a lost training call would
            # leave its seq_id a gap that holds every later call of the model.
            await self._fill_lost(caller, ref.model, ref.order)
            return failed_future(int(Code.UNAVAILABLE), "OPERATION_LOST",
                                 f"the service no longer knows this call (seq_id {ref.order}; it expired, or a "
                                 "scheduler failover during a state store outage lost it); its seq_id now holds "
                                 "a no-op, so send the step again")
        op = response.operation
        if not op.done:
            return try_again(request_id)
        return await self._result(caller, ref, op)

    async def _result(self, caller: Caller, ref: FutureRef, op: operations_pb2.Operation) -> Result:
        which = op.WhichOneof("result")
        if which == "error":
            return failed_future(op.error.code, op.error.reason, op.error.message)
        if which == "forward_backward":
            return convert.forward_backward_output(op.forward_backward)
        if which == "optim_step":
            return {"metrics": dict(op.optim_step.metrics)}
        if which == "save_checkpoint":
            return await self._saved(caller, ref, op.save_checkpoint.checkpoint)
        if which == "load_state":
            path = str(convert.tinker_path(op.load_state.path, ref.model)) if op.load_state.path else None
            return {"type": "load_weights", "model_id": ref.model, "path": path}
        return failed_future(int(Code.CANCELLED), "CANCELLED", f"operation {op.name} ended without a result")

    async def _saved(self, caller: Caller, ref: FutureRef, checkpoint: checkpoints_pb2.Checkpoint) -> Result:
        path = str(convert.tinker_path(checkpoint.path, ref.model))
        if checkpoint.kind == checkpoints_pb2.CHECKPOINT_KIND_STATE:
            return {"type": "save_weights", "path": path}
        if ref.seq < 0:
            return {"type": "save_weights_for_sampler", "path": path}
        entry = await self._sampling.open(caller, ref.session, ref.seq, "", checkpoint.path, path)
        return {"type": "save_weights_for_sampler", "sampling_session_id": entry.sampler_id}


def try_again(request_id: str) -> dict[str, Any]:
    return {"type": "try_again", "request_id": request_id, "queue_state": "active"}

