"""What the fuzz knows of the public API, to reach past the first check.

Purely random requests mostly die at the first lookup (NOT_FOUND for a random run name)
or the first decode. These strategies are mixed *alongside* the generic descriptor
strategies (proto_strategies.Hints): placeholders that the RPC test replaces with real
resources of the caller's tenant ("$RUN" -> "runs/..."), and tensors and datums that are
well-formed, or nearly so (NaN weights, an id one past the vocabulary, a shape off by one).
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from proto_strategies import Hints, integers
from tunemesh.v1 import sampling_pb2, types_pb2
from tunemesh_common.training.loss_specs import SPECS

VOCAB = 1024  # tiny-dense
MAX_SEQ_LEN = 512  # tiny-dense

# Placeholders the RPC test replaces with a real resource of the caller's tenant.
SESSION, RUN, OPERATION = "$SESSION", "$RUN", "$OPERATION"
STATE_CHECKPOINT, SAMPLER_CHECKPOINT, SAMPLING_SESSION = "$STATE_CHECKPOINT", "$SAMPLER_CHECKPOINT", "$SAMPLING_SESSION"
BASE_MODEL = "$BASE_MODEL"
CHECKPOINT_NAME = "$CHECKPOINT_NAME"  # a fresh valid checkpoint name
PLACEHOLDERS = (SESSION, RUN, OPERATION, STATE_CHECKPOINT, SAMPLER_CHECKPOINT, SAMPLING_SESSION, BASE_MODEL,
                CHECKPOINT_NAME)
NEXT_SEQ_ID = -424242  # a seq_id the RPC test replaces with the run's next free one

LOSS_INPUT_KEYS = sorted({key for spec in SPECS.values() for key in spec.required_inputs + spec.optional_inputs})
LOSS_CONFIG_KEYS = sorted({key for spec in SPECS.values() for key in spec.config})

_NUMPY = {types_pb2.DTYPE_FLOAT32: "<f4", types_pb2.DTYPE_INT64: "<i8", types_pb2.DTYPE_INT32: "<i4",
          types_pb2.DTYPE_BFLOAT16: "<u2"}
WIRE_DTYPES = sorted(_NUMPY)


@st.composite
def well_formed_tensors(draw, shape=None) -> types_pb2.TensorData:
    """A TensorData whose bytes are exactly what its dtype and shape need (any values:
    random bytes make NaN, infinities and out-of-vocabulary ids)."""
    dtype = draw(st.sampled_from(WIRE_DTYPES))
    if shape is None:
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
    size = math.prod(shape) * np.dtype(_NUMPY[dtype]).itemsize
    data = draw(st.binary(min_size=size, max_size=size))
    return types_pb2.TensorData(dtype=dtype, shape=shape, data=data)


def empty_huge_tensors() -> st.SearchStrategy[types_pb2.TensorData]:
    """Zero elements (a 0 dimension) next to huge dimensions, or more dimensions than numpy
    has: no bytes, so only the shape can be wrong."""
    huge = integers(2**31 - 1, 2**63 - 1)
    others = st.lists(st.one_of(st.just(0), huge), max_size=79)
    dims = st.tuples(others, st.integers(0, 79)).map(lambda d: d[0][:d[1]] + [0] + d[0][d[1]:])
    return st.builds(types_pb2.TensorData, dtype=st.sampled_from(WIRE_DTYPES), shape=dims, data=st.just(b""))


def often(common: st.SearchStrategy, rare: st.SearchStrategy, odds: int = 7) -> st.SearchStrategy:
    """`common` about `odds` times as often as `rare`."""
    return st.one_of(*[common] * odds, rare)


def token_ids() -> st.SearchStrategy[int]:
    """Mostly ids of the vocabulary, sometimes one just outside it or an int32 edge."""
    return often(st.integers(0, VOCAB - 1), st.sampled_from([-1, VOCAB, VOCAB + 1, 2**31 - 1, -(2**31)]))


_INPUT_SETS = [("target_tokens",), ("target_tokens", "weights"), ("target_tokens", "logprobs", "advantages"),
               ("target_tokens", "logprobs", "advantages", "weights")]
_DEFECTS = ["bad_token", "bad_target", "shape_off", "nan_input", "unknown_input", "no_targets", "k_zero",
            "k_too_many", "float_targets"]


@st.composite
def near_valid_datums(draw) -> types_pb2.Datum:
    """A well-formed datum for one of the losses (n tokens, (n,) or (n, K) inputs), or
    one with a single defect."""
    defect = draw(often(st.none(), st.sampled_from(_DEFECTS), odds=2))
    n = draw(st.integers(1, 12))
    tokens = draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n))
    if defect == "bad_token":
        tokens[draw(st.integers(0, n - 1))] = draw(st.sampled_from([-1, VOCAB, 2**31 - 1, -(2**31)]))
    datum = types_pb2.Datum()
    cut = draw(st.integers(1, n))  # tokens split over two chunks
    for chunk in (tokens[:cut], tokens[cut:]):
        if chunk:
            datum.model_input.chunks.add().encoded_text.tokens.extend(chunk)
    k = {"k_zero": (0,), "k_too_many": (129,)}.get(defect) or draw(st.sampled_from([(), (), (), (1,), (3,)]))
    size = n * math.prod(k)
    targets = draw(st.lists(st.integers(0, VOCAB - 1), min_size=size, max_size=size))
    if defect == "bad_target" and targets:
        targets[0] = VOCAB
    target_dtype = "<f4" if defect == "float_targets" else "<i8"
    keys = list(draw(st.sampled_from(_INPUT_SETS))) + (["bogus"] if defect == "unknown_input" else [])
    for key in keys:
        if key == "target_tokens":
            if defect != "no_targets":
                datum.loss_fn_inputs[key].CopyFrom(_tensor(np.asarray(targets, target_dtype), [n, *k]))
            continue
        shape = [n + (1 if defect == "shape_off" else 0), *k]
        values = draw(st.lists(st.floats(-4, 4, width=32), min_size=math.prod(shape), max_size=math.prod(shape)))
        if defect == "nan_input" and values:
            values[-1] = float("nan")
        datum.loss_fn_inputs[key].CopyFrom(_tensor(np.asarray(values, "<f4"), shape))
    return datum


def _tensor(values: np.ndarray, shape: list[int]) -> types_pb2.TensorData:
    dtype = types_pb2.DTYPE_FLOAT32 if values.dtype.kind == "f" else types_pb2.DTYPE_INT64
    return types_pb2.TensorData(dtype=dtype, shape=shape, data=values.tobytes())


def prompts() -> st.SearchStrategy[types_pb2.ModelInput]:
    """A prompt of 1-16 token ids (mostly in the vocabulary) over one or two chunks."""
    def prompt(chunks: list[list[int]]) -> types_pb2.ModelInput:
        message = types_pb2.ModelInput()
        for tokens in chunks:
            message.chunks.add().encoded_text.tokens.extend(tokens)
        return message
    return st.lists(st.lists(token_ids(), min_size=1, max_size=8), min_size=1, max_size=2).map(prompt)


def adam_params() -> st.SearchStrategy[types_pb2.AdamParams]:
    return st.builds(types_pb2.AdamParams, learning_rate=st.floats(0, 1e-2), beta1=st.floats(0, 0.99),
                     beta2=st.floats(0, 0.999), eps=st.floats(1e-12, 1e-6), weight_decay=st.floats(0, 0.1),
                     grad_clip_norm=st.floats(0, 10))


def sampling_params() -> st.SearchStrategy[sampling_pb2.SamplingParams]:
    return st.builds(sampling_pb2.SamplingParams, max_tokens=st.integers(1, 8), temperature=st.floats(0, 2, width=32),
                     top_p=st.floats(0, 1, width=32), top_k=st.integers(0, 50),
                     stop=st.lists(st.text(min_size=1, max_size=4), max_size=2),
                     stop_token_ids=st.lists(st.integers(0, VOCAB - 1), max_size=2), seed=st.integers(0, 2**63 - 1))


def lora_configs() -> st.SearchStrategy[types_pb2.LoraConfig]:
    return st.builds(types_pb2.LoraConfig, rank=st.integers(0, 8), alpha=st.floats(0, 64, width=32),
                     train_attn=st.booleans(), train_mlp=st.booleans(), train_unembed=st.just(True),
                     seed=st.integers(0, 2**63 - 1), train_experts=st.booleans())


def tensors() -> st.SearchStrategy[types_pb2.TensorData]:
    """Tensors beside the generic ones: well-formed, and empty with huge dimensions."""
    return st.one_of(well_formed_tensors(), empty_huge_tensors())


def loss_names() -> st.SearchStrategy[str]:
    return st.sampled_from(sorted(SPECS) + ["", "CROSS_ENTROPY", "cross_entropy "])


# Where each placeholder belongs: field (plain name, or full name where a name is ambiguous)
# -> what it names; any other placeholder, or any string, is drawn beside it.
RESOURCE_FIELDS = {
    "run": (RUN,), "session": (SESSION,), "sampling_session": (SAMPLING_SESSION,), "base_model": (BASE_MODEL,),
    "names": (OPERATION,), "path": (STATE_CHECKPOINT, SAMPLER_CHECKPOINT),
    "from_checkpoint": ("", STATE_CHECKPOINT, SAMPLER_CHECKPOINT), "model_path": ("", SAMPLER_CHECKPOINT),
    **{f"tunemesh.v1.{m}.name": (RUN,) for m in ("GetTrainingRunRequest", "DeleteTrainingRunRequest",
                                                  "ResumeTrainingRunRequest")},
    **{f"tunemesh.v1.{m}.name": (OPERATION,) for m in ("GetOperationRequest", "WaitOperationRequest",
                                                        "CancelOperationRequest")},
    **{f"tunemesh.v1.{m}.name": ("", CHECKPOINT_NAME) for m in ("SaveStateRequest", "SaveWeightsForSamplerRequest",
                                                                 "ImportCheckpointHeader")},
}


def hints() -> Hints:
    """The hints of the RPC fuzz: resource placeholders and near-valid payloads, drawn
    three times as often as the generic values beside them."""
    anywhere = st.sampled_from(PLACEHOLDERS)
    config_keys = st.sampled_from(LOSS_CONFIG_KEYS)
    return Hints(
        fields={
            **{field: st.one_of(st.sampled_from(names), anywhere) for field, names in RESOURCE_FIELDS.items()},
            "loss_fn": often(st.sampled_from(["", *sorted(SPECS)]), loss_names(), odds=3),
            "tunemesh.v1.Datum.LossFnInputsEntry.key": st.sampled_from(LOSS_INPUT_KEYS),
            "tunemesh.v1.ForwardRequest.LossFnConfigEntry.key": config_keys,
            "tunemesh.v1.ForwardBackwardRequest.LossFnConfigEntry.key": config_keys,
            "tunemesh.v1.EncodedTextChunk.tokens": token_ids(),
            "stop_token_ids": token_ids(),
            "seq_id": st.just(NEXT_SEQ_ID),
            "max_tokens": st.integers(1, 8),
            "num_samples": st.integers(1, 3),
            "ttl_seconds": st.integers(0, 3600),
        },
        types={
            "tunemesh.v1.TensorData": tensors(),
            "tunemesh.v1.Datum": near_valid_datums(),
            "tunemesh.v1.LossConfigValue": st.builds(types_pb2.LossConfigValue, number=st.floats(0, 2)),
            "tunemesh.v1.ModelInput": prompts(),
            "tunemesh.v1.AdamParams": adam_params(),
            "tunemesh.v1.SamplingParams": sampling_params(),
            "tunemesh.v1.LoraConfig": lora_configs(),
        },
        weight=3,
    )
