"""gRPC servicer of tunemesh.internal.v1.TrainerService: decode, call core, encode."""

from __future__ import annotations

from tunemesh.internal.v1 import trainer_pb2, trainer_pb2_grpc
from tunemesh.v1 import sessions_pb2
from tunemesh_common.errors import InvalidArgument, TunemeshError, Unavailable
from tunemesh_common.checkpoint_client import CheckpointStorageClient
from tunemesh_trainer import convert
from tunemesh_trainer.checkpoints import CheckpointBridge
from tunemesh_trainer.core import TrainerCore


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """Registered before the server starts; answers UNAVAILABLE LOADING until `attach`."""

    def __init__(self, node_id: str, address: str, metrics_url: str = "",
                 checkpoints: CheckpointStorageClient | None = None) -> None:
        self._core: TrainerCore | None = None
        self._bridge: CheckpointBridge | None = None
        self._storage = checkpoints or CheckpointStorageClient("")
        self._node_id = node_id
        self._address = address
        self._metrics_url = metrics_url
        self._tokenizer_files: list[sessions_pb2.TokenizerFile] = []

    def attach(self, core: TrainerCore, tokenizer_files: dict[str, bytes]) -> None:
        """Start serving with a loaded engine."""
        self._tokenizer_files = [sessions_pb2.TokenizerFile(name=n, content=c) for n, c in tokenizer_files.items()]
        self._bridge = CheckpointBridge(core, self._storage)
        self._core = core

    @property
    def core(self) -> TrainerCore:
        if self._core is None:
            raise Unavailable("LOADING", f"trainer {self._node_id} is still loading its base model")
        return self._core

    def node(self) -> trainer_pb2.TrainerNode:
        return trainer_pb2.TrainerNode(
            node_id=self._node_id,
            address=self._address,
            models=[convert.supported_model(self.core.info)],
            max_adapters=self.core.max_adapters,
            adapters=self.core.adapter_count(),
            metrics_url=self._metrics_url,
        )

    async def GetTrainerInfo(self, request, context):
        return trainer_pb2.GetTrainerInfoResponse(node=self.node())

    async def CreateAdapter(self, request, context):
        if request.base_model and request.base_model != self.core.info.name:
            raise InvalidArgument(
                "WRONG_BASE_MODEL", f"node {self._node_id} serves {self.core.info.name}, not {request.base_model}"
            )
        count = await self.core.create_adapter(request.adapter_id, convert.lora_spec(request.lora_config))
        return trainer_pb2.CreateAdapterResponse(num_parameters=count)

    async def DeleteAdapter(self, request, context):
        await self.core.delete_adapter(request.adapter_id)
        return trainer_pb2.DeleteAdapterResponse()

    async def RunBatch(self, request, context):
        decoded, optims, early = [], [], {}
        for item in request.items:
            try:
                if item.kind == trainer_pb2.ITEM_KIND_OPTIM_STEP:
                    optims.append(convert.optim_item(item))
                else:
                    decoded.append(convert.engine_item(item))
            except TunemeshError as err:
                early[item.item_id] = convert.item_error(item.item_id, int(err.code), err.reason, err.message)
        outcomes, seconds = await self.core.run_batch(decoded, optims) if decoded or optims else ([], 0.0)
        optim_ids = {o.item_id for o in optims}
        done = {o.item_id: convert.item_result(o, o.item_id in optim_ids) for o in outcomes} | early
        return trainer_pb2.RunBatchResponse(
            results=[done[item.item_id] for item in request.items], engine_seconds=seconds
        )

    async def OptimStep(self, request, context):
        metrics = await self.core.optim_step(request.adapter_id, convert.adam_spec(request.adam_params))
        return trainer_pb2.OptimStepResponse(metrics=metrics)

    async def GetTokenizer(self, request, context):
        self.core  # UNAVAILABLE LOADING until the model is attached
        return trainer_pb2.GetTokenizerResponse(files=self._tokenizer_files)

    async def SaveAdapter(self, request, context):
        self.core  # UNAVAILABLE LOADING until the model is attached
        checkpoint = await self._bridge.save(request)
        return trainer_pb2.SaveAdapterResponse(checkpoint=checkpoint)

    async def LoadAdapter(self, request, context):
        self.core
        step = await self._bridge.load(request)
        return trainer_pb2.LoadAdapterResponse(step=step)
