from tunemesh.v1 import checkpoints_pb2 as _checkpoints_pb2
from tunemesh.v1 import operations_pb2 as _operations_pb2
from tunemesh.v1 import training_pb2 as _training_pb2
from tunemesh.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StoredSession(_message.Message):
    __slots__ = ("name", "tenant", "labels", "create_time", "ended")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    labels: _containers.ScalarMap[str, str]
    create_time: float
    ended: bool
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., create_time: _Optional[float] = ..., ended: _Optional[bool] = ...) -> None: ...

class StoredSamplingSession(_message.Message):
    __slots__ = ("name", "tenant", "session", "base_model", "model_path", "adapter_key", "create_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    session: str
    base_model: str
    model_path: str
    adapter_key: str
    create_time: float
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., session: _Optional[str] = ..., base_model: _Optional[str] = ..., model_path: _Optional[str] = ..., adapter_key: _Optional[str] = ..., create_time: _Optional[float] = ...) -> None: ...

class StoredRun(_message.Message):
    __slots__ = ("name", "tenant", "session", "base_model", "lora", "node_id", "create_time", "epoch", "last_seq_id", "step", "request_id", "snapshot_path", "snapshot_seq_id", "origin_path", "origin_with_optimizer", "user_metadata")
    class UserMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_PATH_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_PATH_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_WITH_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    USER_METADATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    session: str
    base_model: str
    lora: _types_pb2.LoraConfig
    node_id: str
    create_time: float
    epoch: int
    last_seq_id: int
    step: int
    request_id: str
    snapshot_path: str
    snapshot_seq_id: int
    origin_path: str
    origin_with_optimizer: bool
    user_metadata: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., session: _Optional[str] = ..., base_model: _Optional[str] = ..., lora: _Optional[_Union[_types_pb2.LoraConfig, _Mapping]] = ..., node_id: _Optional[str] = ..., create_time: _Optional[float] = ..., epoch: _Optional[int] = ..., last_seq_id: _Optional[int] = ..., step: _Optional[int] = ..., request_id: _Optional[str] = ..., snapshot_path: _Optional[str] = ..., snapshot_seq_id: _Optional[int] = ..., origin_path: _Optional[str] = ..., origin_with_optimizer: _Optional[bool] = ..., user_metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StoredSave(_message.Message):
    __slots__ = ("path", "include_optimizer_state", "ttl_seconds", "user_metadata")
    class UserMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PATH_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    USER_METADATA_FIELD_NUMBER: _ClassVar[int]
    path: str
    include_optimizer_state: bool
    ttl_seconds: int
    user_metadata: _containers.ScalarMap[str, str]
    def __init__(self, path: _Optional[str] = ..., include_optimizer_state: _Optional[bool] = ..., ttl_seconds: _Optional[int] = ..., user_metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StoredLoad(_message.Message):
    __slots__ = ("path", "load_optimizer_state")
    PATH_FIELD_NUMBER: _ClassVar[int]
    LOAD_OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    path: str
    load_optimizer_state: bool
    def __init__(self, path: _Optional[str] = ..., load_optimizer_state: _Optional[bool] = ...) -> None: ...

class StoredLoadResult(_message.Message):
    __slots__ = ("path", "step")
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    path: str
    step: int
    def __init__(self, path: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class StoredPayload(_message.Message):
    __slots__ = ("kind", "forward", "forward_backward", "optim_step", "save", "load", "call_store")
    KIND_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    FORWARD_BACKWARD_FIELD_NUMBER: _ClassVar[int]
    OPTIM_STEP_FIELD_NUMBER: _ClassVar[int]
    SAVE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    CALL_STORE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    forward: _training_pb2.ForwardRequest
    forward_backward: _training_pb2.ForwardBackwardRequest
    optim_step: _training_pb2.OptimStepRequest
    save: StoredSave
    load: StoredLoad
    call_store: StoredCallRef
    def __init__(self, kind: _Optional[str] = ..., forward: _Optional[_Union[_training_pb2.ForwardRequest, _Mapping]] = ..., forward_backward: _Optional[_Union[_training_pb2.ForwardBackwardRequest, _Mapping]] = ..., optim_step: _Optional[_Union[_training_pb2.OptimStepRequest, _Mapping]] = ..., save: _Optional[_Union[StoredSave, _Mapping]] = ..., load: _Optional[_Union[StoredLoad, _Mapping]] = ..., call_store: _Optional[_Union[StoredCallRef, _Mapping]] = ...) -> None: ...

class StoredCallRef(_message.Message):
    __slots__ = ("size_bytes", "sha256")
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    sha256: bytes
    def __init__(self, size_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class StoredOperation(_message.Message):
    __slots__ = ("name", "tenant", "run", "seq_id", "kind", "request_id", "payload_digest", "num_tokens", "create_time", "state", "end_time", "error", "forward_backward_result", "optim_step_result", "checkpoint", "load_result")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_DIGEST_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FORWARD_BACKWARD_RESULT_FIELD_NUMBER: _ClassVar[int]
    OPTIM_STEP_RESULT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    LOAD_RESULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    run: str
    seq_id: int
    kind: str
    request_id: str
    payload_digest: bytes
    num_tokens: int
    create_time: float
    state: str
    end_time: float
    error: _operations_pb2.OperationError
    forward_backward_result: _types_pb2.ForwardBackwardResult
    optim_step_result: _types_pb2.OptimStepResult
    checkpoint: _checkpoints_pb2.Checkpoint
    load_result: StoredLoadResult
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., run: _Optional[str] = ..., seq_id: _Optional[int] = ..., kind: _Optional[str] = ..., request_id: _Optional[str] = ..., payload_digest: _Optional[bytes] = ..., num_tokens: _Optional[int] = ..., create_time: _Optional[float] = ..., state: _Optional[str] = ..., end_time: _Optional[float] = ..., error: _Optional[_Union[_operations_pb2.OperationError, _Mapping]] = ..., forward_backward_result: _Optional[_Union[_types_pb2.ForwardBackwardResult, _Mapping]] = ..., optim_step_result: _Optional[_Union[_types_pb2.OptimStepResult, _Mapping]] = ..., checkpoint: _Optional[_Union[_checkpoints_pb2.Checkpoint, _Mapping]] = ..., load_result: _Optional[_Union[StoredLoadResult, _Mapping]] = ...) -> None: ...
