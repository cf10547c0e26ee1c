from tunemesh.v1 import checkpoints_pb2 as _checkpoints_pb2
from tunemesh.v1 import operations_pb2 as _operations_pb2
from tunemesh.v1 import sessions_pb2 as _sessions_pb2
from tunemesh.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ItemKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ITEM_KIND_UNSPECIFIED: _ClassVar[ItemKind]
    ITEM_KIND_FORWARD: _ClassVar[ItemKind]
    ITEM_KIND_FORWARD_BACKWARD: _ClassVar[ItemKind]
    ITEM_KIND_OPTIM_STEP: _ClassVar[ItemKind]
ITEM_KIND_UNSPECIFIED: ItemKind
ITEM_KIND_FORWARD: ItemKind
ITEM_KIND_FORWARD_BACKWARD: ItemKind
ITEM_KIND_OPTIM_STEP: ItemKind

class TrainerNode(_message.Message):
    __slots__ = ("node_id", "address", "models", "max_adapters", "adapters", "metrics_url")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    METRICS_URL_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    models: _containers.RepeatedCompositeFieldContainer[_sessions_pb2.SupportedModel]
    max_adapters: int
    adapters: int
    metrics_url: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., models: _Optional[_Iterable[_Union[_sessions_pb2.SupportedModel, _Mapping]]] = ..., max_adapters: _Optional[int] = ..., adapters: _Optional[int] = ..., metrics_url: _Optional[str] = ...) -> None: ...

class GetTrainerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTrainerInfoResponse(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: TrainerNode
    def __init__(self, node: _Optional[_Union[TrainerNode, _Mapping]] = ...) -> None: ...

class CreateAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "base_model", "lora_config", "epoch")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    LORA_CONFIG_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    base_model: str
    lora_config: _types_pb2.LoraConfig
    epoch: int
    def __init__(self, adapter_id: _Optional[str] = ..., base_model: _Optional[str] = ..., lora_config: _Optional[_Union[_types_pb2.LoraConfig, _Mapping]] = ..., epoch: _Optional[int] = ...) -> None: ...

class CreateAdapterResponse(_message.Message):
    __slots__ = ("num_parameters",)
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    num_parameters: int
    def __init__(self, num_parameters: _Optional[int] = ...) -> None: ...

class DeleteAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BatchItem(_message.Message):
    __slots__ = ("item_id", "adapter_id", "kind", "data", "loss_fn", "loss_fn_config", "adam_params", "seq_id", "epoch", "snapshot")
    class LossFnConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _types_pb2.LossConfigValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_types_pb2.LossConfigValue, _Mapping]] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LOSS_FN_FIELD_NUMBER: _ClassVar[int]
    LOSS_FN_CONFIG_FIELD_NUMBER: _ClassVar[int]
    ADAM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    adapter_id: str
    kind: ItemKind
    data: _containers.RepeatedCompositeFieldContainer[_types_pb2.Datum]
    loss_fn: str
    loss_fn_config: _containers.MessageMap[str, _types_pb2.LossConfigValue]
    adam_params: _types_pb2.AdamParams
    seq_id: int
    epoch: int
    snapshot: SnapshotTarget
    def __init__(self, item_id: _Optional[str] = ..., adapter_id: _Optional[str] = ..., kind: _Optional[_Union[ItemKind, str]] = ..., data: _Optional[_Iterable[_Union[_types_pb2.Datum, _Mapping]]] = ..., loss_fn: _Optional[str] = ..., loss_fn_config: _Optional[_Mapping[str, _types_pb2.LossConfigValue]] = ..., adam_params: _Optional[_Union[_types_pb2.AdamParams, _Mapping]] = ..., seq_id: _Optional[int] = ..., epoch: _Optional[int] = ..., snapshot: _Optional[_Union[SnapshotTarget, _Mapping]] = ...) -> None: ...

class SnapshotTarget(_message.Message):
    __slots__ = ("path", "tenant")
    PATH_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    path: str
    tenant: str
    def __init__(self, path: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class BatchItemResult(_message.Message):
    __slots__ = ("item_id", "result", "error", "optim_step")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OPTIM_STEP_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    result: _types_pb2.ForwardBackwardResult
    error: _operations_pb2.OperationError
    optim_step: _types_pb2.OptimStepResult
    def __init__(self, item_id: _Optional[str] = ..., result: _Optional[_Union[_types_pb2.ForwardBackwardResult, _Mapping]] = ..., error: _Optional[_Union[_operations_pb2.OperationError, _Mapping]] = ..., optim_step: _Optional[_Union[_types_pb2.OptimStepResult, _Mapping]] = ...) -> None: ...

class RunBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[BatchItem]
    def __init__(self, items: _Optional[_Iterable[_Union[BatchItem, _Mapping]]] = ...) -> None: ...

class RunBatchResponse(_message.Message):
    __slots__ = ("results", "engine_seconds")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchItemResult]
    engine_seconds: float
    def __init__(self, results: _Optional[_Iterable[_Union[BatchItemResult, _Mapping]]] = ..., engine_seconds: _Optional[float] = ...) -> None: ...

class OptimStepRequest(_message.Message):
    __slots__ = ("adapter_id", "adam_params")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    ADAM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    adam_params: _types_pb2.AdamParams
    def __init__(self, adapter_id: _Optional[str] = ..., adam_params: _Optional[_Union[_types_pb2.AdamParams, _Mapping]] = ...) -> None: ...

class OptimStepResponse(_message.Message):
    __slots__ = ("metrics",)
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    METRICS_FIELD_NUMBER: _ClassVar[int]
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GetTokenizerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTokenizerResponse(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[_sessions_pb2.TokenizerFile]
    def __init__(self, files: _Optional[_Iterable[_Union[_sessions_pb2.TokenizerFile, _Mapping]]] = ...) -> None: ...

class SaveAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "tenant", "path", "include_optimizer_state", "ttl_seconds", "user_metadata", "seq_id", "epoch")
    class UserMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    USER_METADATA_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    tenant: str
    path: str
    include_optimizer_state: bool
    ttl_seconds: int
    user_metadata: _containers.ScalarMap[str, str]
    seq_id: int
    epoch: int
    def __init__(self, adapter_id: _Optional[str] = ..., tenant: _Optional[str] = ..., path: _Optional[str] = ..., include_optimizer_state: _Optional[bool] = ..., ttl_seconds: _Optional[int] = ..., user_metadata: _Optional[_Mapping[str, str]] = ..., seq_id: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class SaveAdapterResponse(_message.Message):
    __slots__ = ("checkpoint",)
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    checkpoint: _checkpoints_pb2.Checkpoint
    def __init__(self, checkpoint: _Optional[_Union[_checkpoints_pb2.Checkpoint, _Mapping]] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "tenant", "path", "load_optimizer_state", "seq_id", "epoch")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    LOAD_OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    tenant: str
    path: str
    load_optimizer_state: bool
    seq_id: int
    epoch: int
    def __init__(self, adapter_id: _Optional[str] = ..., tenant: _Optional[str] = ..., path: _Optional[str] = ..., load_optimizer_state: _Optional[bool] = ..., seq_id: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class RestoreAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "base_model", "lora_config", "epoch", "tenant", "path", "load_optimizer_state")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    LORA_CONFIG_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    LOAD_OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    base_model: str
    lora_config: _types_pb2.LoraConfig
    epoch: int
    tenant: str
    path: str
    load_optimizer_state: bool
    def __init__(self, adapter_id: _Optional[str] = ..., base_model: _Optional[str] = ..., lora_config: _Optional[_Union[_types_pb2.LoraConfig, _Mapping]] = ..., epoch: _Optional[int] = ..., tenant: _Optional[str] = ..., path: _Optional[str] = ..., load_optimizer_state: _Optional[bool] = ...) -> None: ...

class RestoreAdapterResponse(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class AdoptAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "epoch")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    epoch: int
    def __init__(self, adapter_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class AdoptAdapterResponse(_message.Message):
    __slots__ = ("applied_seq_id",)
    APPLIED_SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    applied_seq_id: int
    def __init__(self, applied_seq_id: _Optional[int] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdapterSummary(_message.Message):
    __slots__ = ("adapter_id", "epoch", "applied_seq_id")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    epoch: int
    applied_seq_id: int
    def __init__(self, adapter_id: _Optional[str] = ..., epoch: _Optional[int] = ..., applied_seq_id: _Optional[int] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterSummary]
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterSummary, _Mapping]]] = ...) -> None: ...

class AwaitSnapshotRequest(_message.Message):
    __slots__ = ("adapter_id", "seq_id")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    seq_id: int
    def __init__(self, adapter_id: _Optional[str] = ..., seq_id: _Optional[int] = ...) -> None: ...

class AwaitSnapshotResponse(_message.Message):
    __slots__ = ("checkpoint",)
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    checkpoint: _checkpoints_pb2.Checkpoint
    def __init__(self, checkpoint: _Optional[_Union[_checkpoints_pb2.Checkpoint, _Mapping]] = ...) -> None: ...
