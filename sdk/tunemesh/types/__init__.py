"""User-facing data types, named after Tinker's so cookbook-style code ports as is.

Plain dataclasses over numpy; torch is imported only by the `*_torch` methods. The
submodules group them (`tunemesh.types.tensor_data` is where Tinker keeps TensorData
too); every name is importable from `tunemesh.types`.
"""

from tunemesh.types.capabilities import GetServerCapabilitiesResponse, SupportedModel
from tunemesh.types.checkpoint_path import CheckpointType, ParsedCheckpointTinkerPath
from tunemesh.types.datum import Datum
from tunemesh.types.model_input import (
    EncodedTextChunk,
    ImageAssetPointerChunk,
    ImageChunk,
    ModelInput,
    ModelInputChunk,
)
from tunemesh.types.provenance_spans import PromptProvenanceSpan, ProvenanceSpans, SampledProvenanceSpan
from tunemesh.types.rest import (
    AuditLogEntry,
    AuditLogResponse,
    CheckpointsListResponse,
    Cursor,
    ExternalWeightsUrlsResponse,
    TrainingRunsResponse,
    WeightsInfoResponse,
)
from tunemesh.types.sampling import SampledSequence, SampleResponse, SamplingParams, StopReason
from tunemesh.types.tensor_data import DTYPES, LossFnInput, TensorData, to_tensor_data
from tunemesh.types.training import (
    AdamParams,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoadWeightsResponse,
    LoraConfig,
    LossFnType,
    ModelData,
    OptimStepResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
)

__all__ = [
    "DTYPES",
    "AdamParams",
    "AuditLogEntry",
    "AuditLogResponse",
    "CheckpointType",
    "CheckpointsListResponse",
    "Cursor",
    "Datum",
    "EncodedTextChunk",
    "ExternalWeightsUrlsResponse",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "GetServerCapabilitiesResponse",
    "ImageAssetPointerChunk",
    "ImageChunk",
    "LoadWeightsResponse",
    "LoraConfig",
    "LossFnInput",
    "LossFnType",
    "ModelData",
    "ModelInput",
    "ModelInputChunk",
    "OptimStepResponse",
    "ParsedCheckpointTinkerPath",
    "PromptProvenanceSpan",
    "ProvenanceSpans",
    "SampleResponse",
    "SampledProvenanceSpan",
    "SampledSequence",
    "SamplingParams",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "StopReason",
    "SupportedModel",
    "TensorData",
    "TrainingRunsResponse",
    "WeightsInfoResponse",
    "to_tensor_data",
]
