from tunemesh.v1 import sampling_pb2 as _sampling_pb2
from tunemesh.v1 import sessions_pb2 as _sessions_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplerNode(_message.Message):
    __slots__ = ("node_id", "address", "models", "resident_adapters", "max_adapters", "active_requests", "metrics_url")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_URL_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    models: _containers.RepeatedCompositeFieldContainer[_sessions_pb2.SupportedModel]
    resident_adapters: _containers.RepeatedScalarFieldContainer[str]
    max_adapters: int
    active_requests: int
    metrics_url: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., models: _Optional[_Iterable[_Union[_sessions_pb2.SupportedModel, _Mapping]]] = ..., resident_adapters: _Optional[_Iterable[str]] = ..., max_adapters: _Optional[int] = ..., active_requests: _Optional[int] = ..., metrics_url: _Optional[str] = ...) -> None: ...

class AdapterRef(_message.Message):
    __slots__ = ("tenant", "path")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    path: str
    def __init__(self, tenant: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class GetSamplerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetSamplerInfoResponse(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: SamplerNode
    def __init__(self, node: _Optional[_Union[SamplerNode, _Mapping]] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("adapter", "prompt_tokens", "num_samples", "sampling_params", "prompt_logprobs")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterRef
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    num_samples: int
    sampling_params: _sampling_pb2.SamplingParams
    prompt_logprobs: bool
    def __init__(self, adapter: _Optional[_Union[AdapterRef, _Mapping]] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., num_samples: _Optional[int] = ..., sampling_params: _Optional[_Union[_sampling_pb2.SamplingParams, _Mapping]] = ..., prompt_logprobs: _Optional[bool] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("sequences", "prompt_logprobs")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[_sampling_pb2.SampledSequence]
    prompt_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, sequences: _Optional[_Iterable[_Union[_sampling_pb2.SampledSequence, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class ComputeLogprobsRequest(_message.Message):
    __slots__ = ("adapter", "prompt_tokens")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterRef
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, adapter: _Optional[_Union[AdapterRef, _Mapping]] = ..., prompt_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ComputeLogprobsResponse(_message.Message):
    __slots__ = ("logprobs",)
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, logprobs: _Optional[_Iterable[float]] = ...) -> None: ...
