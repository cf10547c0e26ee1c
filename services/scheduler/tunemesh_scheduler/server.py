"""gRPC servicers of the public API: authenticate (interceptor), validate, call core, encode."""

from __future__ import annotations

from tunemesh.v1 import (
    operations_pb2, operations_pb2_grpc, sessions_pb2, sessions_pb2_grpc, training_pb2, training_pb2_grpc,
)
from tunemesh_common.rpc import current_tenant
from tunemesh_scheduler import convert, validation
from tunemesh_scheduler.core import OpKind, SchedulerCore
from tunemesh_scheduler.nodes import TrainerDirectory
from tunemesh_scheduler.tokenizers import TokenizerCache


class SessionServicer(sessions_pb2_grpc.SessionServiceServicer):
    def __init__(self, core: SchedulerCore, directory: TrainerDirectory, limits: validation.Limits,
                 tokenizers: TokenizerCache) -> None:
        self._core, self._directory, self._limits, self._tokenizers = core, directory, limits, tokenizers

    async def CreateSession(self, request, context):
        record = self._core.create_session(current_tenant(), dict(request.labels))
        return sessions_pb2.CreateSessionResponse(session=convert.session(record))

    async def HeartbeatSession(self, request, context):
        self._core.heartbeat_session(current_tenant(), request.session)
        return sessions_pb2.HeartbeatSessionResponse()

    async def EndSession(self, request, context):
        self._core.end_session(current_tenant(), request.session)
        return sessions_pb2.EndSessionResponse()

    async def GetCapabilities(self, request, context):
        limits = sessions_pb2.RequestLimits(max_datums=self._limits.max_datums, max_tokens=self._limits.max_tokens)
        return sessions_pb2.GetCapabilitiesResponse(models=self._directory.models(), limits=limits)

    async def GetTokenizer(self, request, context):
        files = await self._tokenizers.files(request.base_model)
        return sessions_pb2.GetTokenizerResponse(files=files)


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, core: SchedulerCore, directory: TrainerDirectory, limits: validation.Limits) -> None:
        self._core, self._directory, self._limits = core, directory, limits

    async def CreateTrainingRun(self, request, context):
        model = self._directory.model(request.base_model)
        validation.check_lora(request.lora_config, model)
        lora = validation.normalized_lora(request.lora_config, model)
        record = await self._core.create_run(
            current_tenant(), request.session, request.base_model, lora, request.request_id
        )
        return training_pb2.CreateTrainingRunResponse(run=convert.run(record))

    async def GetTrainingRun(self, request, context):
        return training_pb2.GetTrainingRunResponse(run=convert.run(self._core.get_run(current_tenant(), request.name)))

    async def ListTrainingRuns(self, request, context):
        records, token = self._core.list_runs(current_tenant(), request.page_size, request.page_token)
        return training_pb2.ListTrainingRunsResponse(runs=[convert.run(r) for r in records], next_page_token=token)

    async def DeleteTrainingRun(self, request, context):
        await self._core.delete_run(current_tenant(), request.name)
        return training_pb2.DeleteTrainingRunResponse()

    async def Forward(self, request, context):
        op = await self._submit_data(request, OpKind.FORWARD)
        return training_pb2.ForwardResponse(operation=op)

    async def ForwardBackward(self, request, context):
        op = await self._submit_data(request, OpKind.FORWARD_BACKWARD)
        return training_pb2.ForwardBackwardResponse(operation=op)

    async def OptimStep(self, request, context):
        tenant = current_tenant()
        self._core.get_run(tenant, request.run)  # NotFound before anything else
        validation.check_adam(request.adam_params)
        record = await self._core.submit(
            tenant, request.run, request.seq_id, request.request_id, OpKind.OPTIM_STEP, request, convert.digest(request)
        )
        return training_pb2.OptimStepResponse(operation=convert.operation(record))

    async def _submit_data(self, request, kind: OpKind):
        tenant = current_tenant()
        run = self._core.get_run(tenant, request.run)
        validation.check_loss(request.loss_fn or "cross_entropy", request.loss_fn_config)
        model = self._directory.serving_model(run.base_model)
        tokens = validation.check_data(request.data, request.loss_fn or "cross_entropy", model, self._limits)
        record = await self._core.submit(
            tenant, request.run, request.seq_id, request.request_id, kind, request, convert.digest(request), tokens
        )
        return convert.operation(record)


class OperationServicer(operations_pb2_grpc.OperationServiceServicer):
    def __init__(self, core: SchedulerCore, wait_cap_s: float) -> None:
        self._core, self._wait_cap_s = core, wait_cap_s

    async def GetOperation(self, request, context):
        record = self._core.get_operation(current_tenant(), request.name)
        return operations_pb2.GetOperationResponse(operation=convert.operation(record))

    async def WaitOperation(self, request, context):
        timeout = request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else self._wait_cap_s
        record = await self._core.wait_operation(current_tenant(), request.name, min(timeout, self._wait_cap_s))
        return operations_pb2.WaitOperationResponse(operation=convert.operation(record))

    async def CancelOperation(self, request, context):
        record = self._core.cancel_operation(current_tenant(), request.name)
        return operations_pb2.CancelOperationResponse(operation=convert.operation(record))
