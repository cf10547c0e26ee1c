from tunemesh.v1 import checkpoints_pb2 as _checkpoints_pb2
from tunemesh.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WriteCheckpointHeader(_message.Message):
    __slots__ = ("path", "base_model", "lora_config", "step", "has_optimizer_state", "ttl_seconds", "user_metadata")
    class UserMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PATH_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    LORA_CONFIG_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HAS_OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    USER_METADATA_FIELD_NUMBER: _ClassVar[int]
    path: str
    base_model: str
    lora_config: _types_pb2.LoraConfig
    step: int
    has_optimizer_state: bool
    ttl_seconds: int
    user_metadata: _containers.ScalarMap[str, str]
    def __init__(self, path: _Optional[str] = ..., base_model: _Optional[str] = ..., lora_config: _Optional[_Union[_types_pb2.LoraConfig, _Mapping]] = ..., step: _Optional[int] = ..., has_optimizer_state: _Optional[bool] = ..., ttl_seconds: _Optional[int] = ..., user_metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AdoptCheckpointRequest(_message.Message):
    __slots__ = ("header", "handoff", "files")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    header: WriteCheckpointHeader
    handoff: str
    files: _containers.RepeatedCompositeFieldContainer[_checkpoints_pb2.CheckpointFile]
    def __init__(self, header: _Optional[_Union[WriteCheckpointHeader, _Mapping]] = ..., handoff: _Optional[str] = ..., files: _Optional[_Iterable[_Union[_checkpoints_pb2.CheckpointFile, _Mapping]]] = ...) -> None: ...

class AdoptCheckpointResponse(_message.Message):
    __slots__ = ("checkpoint",)
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    checkpoint: _checkpoints_pb2.Checkpoint
    def __init__(self, checkpoint: _Optional[_Union[_checkpoints_pb2.Checkpoint, _Mapping]] = ...) -> None: ...

class WriteCheckpointRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: WriteCheckpointHeader
    chunk: _checkpoints_pb2.FileChunk
    def __init__(self, header: _Optional[_Union[WriteCheckpointHeader, _Mapping]] = ..., chunk: _Optional[_Union[_checkpoints_pb2.FileChunk, _Mapping]] = ...) -> None: ...

class WriteCheckpointResponse(_message.Message):
    __slots__ = ("checkpoint",)
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    checkpoint: _checkpoints_pb2.Checkpoint
    def __init__(self, checkpoint: _Optional[_Union[_checkpoints_pb2.Checkpoint, _Mapping]] = ...) -> None: ...

class ReadCheckpointRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class ReadCheckpointResponse(_message.Message):
    __slots__ = ("checkpoint", "chunk")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    checkpoint: _checkpoints_pb2.Checkpoint
    chunk: _checkpoints_pb2.FileChunk
    def __init__(self, checkpoint: _Optional[_Union[_checkpoints_pb2.Checkpoint, _Mapping]] = ..., chunk: _Optional[_Union[_checkpoints_pb2.FileChunk, _Mapping]] = ...) -> None: ...

class CallKey(_message.Message):
    __slots__ = ("run", "seq_id")
    RUN_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    run: str
    seq_id: int
    def __init__(self, run: _Optional[str] = ..., seq_id: _Optional[int] = ...) -> None: ...

class PutCallRequest(_message.Message):
    __slots__ = ("key", "chunk")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    key: CallKey
    chunk: bytes
    def __init__(self, key: _Optional[_Union[CallKey, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PutCallResponse(_message.Message):
    __slots__ = ("size_bytes",)
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    def __init__(self, size_bytes: _Optional[int] = ...) -> None: ...

class GetCallRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: CallKey
    def __init__(self, key: _Optional[_Union[CallKey, _Mapping]] = ...) -> None: ...

class GetCallResponse(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    def __init__(self, chunk: _Optional[bytes] = ...) -> None: ...

class DeleteCallsRequest(_message.Message):
    __slots__ = ("run", "through_seq_id", "all")
    RUN_FIELD_NUMBER: _ClassVar[int]
    THROUGH_SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    run: str
    through_seq_id: int
    all: bool
    def __init__(self, run: _Optional[str] = ..., through_seq_id: _Optional[int] = ..., all: _Optional[bool] = ...) -> None: ...

class DeleteCallsResponse(_message.Message):
    __slots__ = ("deleted_count",)
    DELETED_COUNT_FIELD_NUMBER: _ClassVar[int]
    deleted_count: int
    def __init__(self, deleted_count: _Optional[int] = ...) -> None: ...
