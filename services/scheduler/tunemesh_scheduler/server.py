"""gRPC servicers of the public API: authenticate (interceptor), validate, call core, encode."""

from __future__ import annotations

from tunemesh_internal.v1 import sampler_pb2
from tunemesh.v1 import (
    checkpoints_pb2_grpc, operations_pb2, operations_pb2_grpc, sampling_pb2, sampling_pb2_grpc, sessions_pb2,
    sessions_pb2_grpc, training_pb2, training_pb2_grpc,
)
from tunemesh_common.checkpoints.paths import CheckpointKind, CheckpointPath, auto_name, check_name
from tunemesh.errors import FailedPreconditionError, InvalidArgumentError
from tunemesh_scheduler.metrics import SchedulerMetrics
from tunemesh_common.service.rpc import current_tenant
from tunemesh_scheduler import convert, validation
from tunemesh_scheduler.checkpoints import CheckpointProxy
from tunemesh_scheduler.core import DataWork, LoadRequest, OpKind, SaveRequest, SchedulerCore, StepWork
from tunemesh_scheduler.nodes import TrainerDirectory
from tunemesh_scheduler.sampler_client import SamplerRouter
from tunemesh_scheduler.tokenizers import TokenizerCache


WATCH_HEARTBEAT_S = 5.0
"""Default (and longest) interval of WatchOperations heartbeats."""
MIN_WATCH_HEARTBEAT_S = 0.05


class SessionServicer(sessions_pb2_grpc.SessionServiceServicer):
    def __init__(self, core: SchedulerCore, directory: TrainerDirectory, limits: validation.Limits,
                 tokenizers: TokenizerCache) -> None:
        self._core, self._directory, self._limits, self._tokenizers = core, directory, limits, tokenizers

    async def CreateSession(self, request, context):
        record = self._core.create_session(current_tenant(), dict(request.labels))
        await self._core.sync()  # durable before acknowledged (UNAVAILABLE while etcd is down)
        return sessions_pb2.CreateSessionResponse(session=convert.session(record))

    async def HeartbeatSession(self, request, context):
        self._core.heartbeat_session(current_tenant(), request.session)
        return sessions_pb2.HeartbeatSessionResponse()

    async def EndSession(self, request, context):
        self._core.end_session(current_tenant(), request.session)
        await self._core.sync()
        return sessions_pb2.EndSessionResponse()

    async def GetCapabilities(self, request, context):
        limits = sessions_pb2.RequestLimits(max_datums=self._limits.max_datums, max_tokens=self._limits.max_tokens)
        return sessions_pb2.GetCapabilitiesResponse(models=self._directory.models(), limits=limits)

    async def GetTokenizer(self, request, context):
        files = await self._tokenizers.files(request.base_model)
        return sessions_pb2.GetTokenizerResponse(files=files)


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, core: SchedulerCore, directory: TrainerDirectory, limits: validation.Limits,
                 checkpoints: CheckpointProxy) -> None:
        self._core, self._directory, self._limits, self._checkpoints = core, directory, limits, checkpoints

    async def CreateTrainingRun(self, request, context):
        if request.from_checkpoint:
            record = await self._create_from_checkpoint(current_tenant(), request)
            return training_pb2.CreateTrainingRunResponse(run=convert.run(record))
        model = self._directory.model(request.base_model)
        validation.check_lora(request.lora_config, model)
        lora = validation.normalized_lora(request.lora_config, model)
        record = await self._core.create_run(
            current_tenant(), request.session, request.base_model, lora, request.request_id,
            user_metadata=validation.run_user_metadata(request.user_metadata),
        )
        return training_pb2.CreateTrainingRunResponse(run=convert.run(record))

    async def GetTrainingRun(self, request, context):
        return training_pb2.GetTrainingRunResponse(run=convert.run(self._core.get_run(current_tenant(), request.name)))

    async def ListTrainingRuns(self, request, context):
        records, token = self._core.list_runs(current_tenant(), request.page_size, request.page_token)
        return training_pb2.ListTrainingRunsResponse(runs=[convert.run(r) for r in records], next_page_token=token)

    async def ResumeTrainingRun(self, request, context):
        record = await self._core.resume_run(current_tenant(), request.name, request.session)
        return training_pb2.ResumeTrainingRunResponse(run=convert.run(record))

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
        self._core.get_run(tenant, request.run)  # NotFoundError before anything else
        validation.check_adam(request.adam_params)
        record = await self._core.submit(
            tenant, request.run, request.seq_id, request.request_id, OpKind.OPTIM_STEP,
            StepWork(request.adam_params), convert.digest(request), ack_when_queued=request.ack_when_queued,
        )
        return training_pb2.OptimStepResponse(operation=convert.operation(record))

    async def SaveState(self, request, context):
        op = await self._submit_save(request, OpKind.SAVE_STATE, CheckpointKind.STATE)
        return training_pb2.SaveStateResponse(operation=op)

    async def SaveWeightsForSampler(self, request, context):
        op = await self._submit_save(request, OpKind.SAVE_SAMPLER, CheckpointKind.SAMPLER)
        return training_pb2.SaveWeightsForSamplerResponse(operation=op)

    async def LoadState(self, request, context):
        tenant = current_tenant()
        run = self._core.get_run(tenant, request.run)
        checkpoint = await self._checkpoints.get(tenant, request.path)  # NOT_FOUND for others' paths
        validation.check_checkpoint_fits(checkpoint, run.base_model, run.lora, request.load_optimizer_state)
        payload = LoadRequest(checkpoint.path, request.load_optimizer_state)
        record = await self._core.submit(
            tenant, request.run, request.seq_id, request.request_id, OpKind.LOAD_STATE, payload, convert.digest(request),
            ack_when_queued=request.ack_when_queued,
        )
        return training_pb2.LoadStateResponse(operation=convert.operation(record))

    async def _create_from_checkpoint(self, tenant: str, request):
        if request.HasField("lora_config"):
            raise InvalidArgumentError("LORA_CONFIG_FROM_CHECKPOINT", "a run created from a checkpoint takes its LoRA config")
        checkpoint = await self._checkpoints.get(tenant, request.from_checkpoint)
        if request.base_model and request.base_model != checkpoint.base_model:
            raise FailedPreconditionError("WRONG_BASE_MODEL", f"{checkpoint.path} is for {checkpoint.base_model}")
        model = self._directory.model(checkpoint.base_model)
        validation.check_lora(checkpoint.lora_config, model)
        lora = validation.normalized_lora(checkpoint.lora_config, model)
        validation.check_checkpoint_fits(checkpoint, model.name, lora, request.load_optimizer_state)
        restore = LoadRequest(checkpoint.path, request.load_optimizer_state)
        return await self._core.create_run(
            tenant, request.session, model.name, lora, request.request_id, restore,
            user_metadata=validation.run_user_metadata(request.user_metadata),
        )

    async def _submit_save(self, request, kind: OpKind, checkpoint_kind: CheckpointKind):
        tenant = current_tenant()
        self._core.get_run(tenant, request.run)
        validation.check_save(request)
        path = CheckpointPath.for_run(request.run, checkpoint_kind, request.name or auto_name(request.seq_id))
        payload = SaveRequest(str(path), kind is OpKind.SAVE_STATE, request.ttl_seconds,
                              tuple(sorted(request.user_metadata.items())))
        record = await self._core.submit(
            tenant, request.run, request.seq_id, request.request_id, kind, payload, convert.digest(request),
            ack_when_queued=request.ack_when_queued,
        )
        return convert.operation(record)

    async def _submit_data(self, request, kind: OpKind):
        tenant = current_tenant()
        run = self._core.get_run(tenant, request.run)
        loss_fn = request.loss_fn or "cross_entropy"
        validation.check_loss(loss_fn, request.loss_fn_config)
        model = self._directory.serving_model(run.base_model)
        tokens = validation.check_data(request.data, loss_fn, model, self._limits)
        work = DataWork(request.data, loss_fn, request.loss_fn_config, backward=kind is OpKind.FORWARD_BACKWARD)
        record = await self._core.submit(
            tenant, request.run, request.seq_id, request.request_id, kind, work, convert.digest(request), tokens,
            ack_when_queued=request.ack_when_queued,
        )
        return convert.operation(record)


class OperationServicer(operations_pb2_grpc.OperationServiceServicer):
    def __init__(self, core: SchedulerCore, wait_cap_s: float, heartbeat_s: float = WATCH_HEARTBEAT_S) -> None:
        self._core, self._wait_cap_s, self._heartbeat_s = core, wait_cap_s, heartbeat_s

    async def GetOperation(self, request, context):
        record = self._core.get_operation(current_tenant(), request.name)
        return operations_pb2.GetOperationResponse(operation=convert.operation(record))

    async def WaitOperation(self, request, context):
        timeout = validation.duration_seconds(request.timeout, "timeout") if request.HasField("timeout") else self._wait_cap_s
        record = await self._core.wait_operation(current_tenant(), request.name, min(timeout, self._wait_cap_s))
        return operations_pb2.WaitOperationResponse(operation=convert.operation(record))

    async def CancelOperation(self, request, context):
        record = self._core.cancel_operation(current_tenant(), request.name)
        return operations_pb2.CancelOperationResponse(operation=convert.operation(record))

    async def WatchOperations(self, request, context):
        asked = (validation.duration_seconds(request.heartbeat_interval, "heartbeat_interval")
                 if request.HasField("heartbeat_interval") else 0)
        heartbeat_s = min(max(asked, MIN_WATCH_HEARTBEAT_S), self._heartbeat_s) if asked else self._heartbeat_s
        watch = self._core.watch_operations(current_tenant(), request.epoch, request.cursor, list(request.names),
                                            heartbeat_s)
        async for batch in watch:
            yield operations_pb2.WatchOperationsResponse(
                epoch=batch.epoch, cursor=batch.cursor, operations=[convert.operation(op) for op in batch.items],
                cursor_lost=batch.cursor_lost, missing=batch.missing)


class CheckpointServicer(checkpoints_pb2_grpc.CheckpointServiceServicer):
    """The public checkpoint API, forwarded to the checkpoint service for the caller's tenant."""

    def __init__(self, checkpoints: CheckpointProxy, directory: TrainerDirectory) -> None:
        self._checkpoints, self._directory = checkpoints, directory

    async def ListCheckpoints(self, request, context):
        return await self._checkpoints.list(request, current_tenant())

    async def GetCheckpoint(self, request, context):
        return await self._checkpoints.get_checkpoint(request, current_tenant())

    async def DeleteCheckpoint(self, request, context):
        return await self._checkpoints.delete(request, current_tenant())

    async def UpdateCheckpointTtl(self, request, context):
        return await self._checkpoints.update_ttl(request, current_tenant())

    async def DownloadCheckpoint(self, request, context):
        async for response in self._checkpoints.download(request, current_tenant()):
            yield response

    async def ImportCheckpoint(self, request_iterator, context):
        tenant = current_tenant()
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgumentError("BAD_UPLOAD", "the first message must carry the header")
        check_name(first.header.name)
        self._directory.model(first.header.base_model)  # NOT_FOUND UNKNOWN_MODEL

        async def forwarded():
            yield first
            async for request in request_iterator:
                yield request

        return await self._checkpoints.import_(forwarded(), tenant)


class SamplingServicer(sampling_pb2_grpc.SamplingServiceServicer):
    """Sampling sessions pinned to a base model or one checkpoint, forwarded to samplers."""

    def __init__(self, core: SchedulerCore, samplers: SamplerRouter, checkpoints: CheckpointProxy,
                 limits: validation.Limits, metrics: SchedulerMetrics | None = None) -> None:
        self._core, self._samplers, self._checkpoints, self._limits = core, samplers, checkpoints, limits
        self._metrics = metrics or SchedulerMetrics()

    async def CreateSamplingSession(self, request, context):
        record = await self._core.create_sampling_session(
            current_tenant(), request.session, request.base_model, request.model_path,
            checkpoints=self._checkpoints, samplers=self._samplers.directory,
        )
        return sampling_pb2.CreateSamplingSessionResponse(sampling_session=convert.sampling_session(record))

    async def Sample(self, request, context):
        tenant = current_tenant()
        record = self._core.get_sampling_session(tenant, request.sampling_session)
        model = self._samplers.directory.serving_model(record.base_model)
        tokens = validation.check_prompt(request.prompt, model)
        params = sampling_pb2.SamplingParams()
        params.CopyFrom(request.sampling_params)
        params.max_tokens = validation.check_sampling(params, request.num_samples, len(tokens), model, self._limits)
        forwarded = sampler_pb2.SampleRequest(
            adapter=convert.adapter_ref(record), prompt_tokens=tokens, num_samples=request.num_samples,
            sampling_params=params, prompt_logprobs=request.prompt_logprobs,
        )
        response = await self._samplers.sample(record, forwarded)
        self._metrics.sampling_tokens(tenant, "prompt", len(tokens))
        self._metrics.sampling_tokens(tenant, "generated", sum(len(seq.tokens) for seq in response.sequences))
        for sequence in response.sequences:
            sequence.sequence_id = convert.new_sequence_id()
        return sampling_pb2.SampleResponse(sequences=response.sequences, prompt_logprobs=response.prompt_logprobs)

    async def ComputeLogprobs(self, request, context):
        tenant = current_tenant()
        record = self._core.get_sampling_session(tenant, request.sampling_session)
        tokens = validation.check_prompt(request.prompt, self._samplers.directory.serving_model(record.base_model))
        forwarded = sampler_pb2.ComputeLogprobsRequest(adapter=convert.adapter_ref(record), prompt_tokens=tokens)
        response = await self._samplers.compute_logprobs(record, forwarded)
        self._metrics.sampling_tokens(tenant, "logprobs", len(tokens))
        return sampling_pb2.ComputeLogprobsResponse(logprobs=response.logprobs)
