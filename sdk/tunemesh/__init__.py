"""tunemesh SDK: train LoRA adapters on a tunemesh service with Tinker-style primitives.

    import tunemesh
    with tunemesh.ServiceClient("127.0.0.1:50051", api_key="tml-...", ca_bundle="ca.pem") as service:
        trainer = service.create_lora_training_client("tiny-dense", rank=8)
        fb = trainer.forward_backward([tunemesh.Datum(...)], "cross_entropy")
        step = trainer.optim_step(tunemesh.AdamParams(learning_rate=1e-4))
        print(fb.result().metrics, step.result().metrics)

Tinker's names are exported too (`import tunemesh as tinker`): its error names are
tunemesh's errors (see `tunemesh.errors`), RestClient and AdminClient map its REST calls
onto tunemesh's, and `tunemesh.lib.public_interfaces` mirrors its module path.

Names are exported lazily, so `import tunemesh` (and `import tunemesh.v1.*_pb2` by the
services) loads neither grpc nor numpy until an SDK name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "tunemesh.client": ("ServiceClient",),
    "tunemesh.checkpoints": ("Checkpoint", "CheckpointClient", "CheckpointFile"),
    "tunemesh.training_client": ("TrainingClient",),
    "tunemesh.sampling_client": ("SamplingClient",),
    "tunemesh.rest_client": ("AdminClient", "RestClient"),
    "tunemesh.futures": ("APIFuture",),
    "tunemesh.retry": ("RetryPolicy",),
    "tunemesh.hyperparams": ("lora_learning_rate",),
    "tunemesh.types": (
        "AdamParams",
        "Datum",
        "EncodedTextChunk",
        "ForwardBackwardOutput",
        "GetInfoResponse",
        "GetServerCapabilitiesResponse",
        "LoadWeightsResponse",
        "LoraConfig",
        "ModelData",
        "ModelInput",
        "ModelInputChunk",
        "SampleResponse",
        "SampledSequence",
        "SamplingParams",
        "OptimStepResponse",
        "ParsedCheckpointTinkerPath",
        "PromptProvenanceSpan",
        "SampledProvenanceSpan",
        "SaveWeightsForSamplerResponse",
        "SaveWeightsResponse",
        "StopReason",
        "SupportedModel",
        "TensorData",
    ),
    "tunemesh.errors": (
        "TunemeshError",
        "TinkerError",
        "APIError",
        "APIConnectionError",
        "APITimeoutError",
        "AuthenticationError",
        "BadRequestError",
        "RateLimitError",
        "AbortedError",
        "AlreadyExistsError",
        "CancelledError",
        "ClientClosedError",
        "DataLossError",
        "DeadlineExceededError",
        "FailedPreconditionError",
        "InternalError",
        "InvalidArgumentError",
        "NotFoundError",
        "PermissionDeniedError",
        "ResourceExhaustedError",
        "UnauthenticatedError",
        "UnavailableError",
        "UnimplementedError",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)

if TYPE_CHECKING:
    from tunemesh.checkpoints import Checkpoint, CheckpointClient, CheckpointFile
    from tunemesh.client import ServiceClient
    from tunemesh.errors import *  # noqa: F403
    from tunemesh.futures import APIFuture
    from tunemesh.hyperparams import lora_learning_rate
    from tunemesh.rest_client import AdminClient, RestClient
    from tunemesh.retry import RetryPolicy
    from tunemesh.sampling_client import SamplingClient
    from tunemesh.training_client import TrainingClient
    from tunemesh.types import *  # noqa: F403


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'tunemesh' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
