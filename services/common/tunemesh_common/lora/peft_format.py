"""The PEFT LoRA adapter directory: `adapter_config.json` + `adapter_model.safetensors`.

This is the on-disk format of every checkpoint, so a download loads as is with
`peft.PeftModel.from_pretrained(base, dir)`. Tensor keys are PEFT's,
`base_model.model.<module>.lora_A.weight` (A: rank x in, B: out x rank); inside tunemesh
the same tensors are named `<module>.lora_A.weight`. Pure Python: the checkpoint service
validates imports without torch.

LoRA on fused MoE expert weights is PEFT's `target_parameters` (A: experts*rank x in,
B: out x rank*experts). PEFT nests one wrapper per parameter on the experts module, in the
module's parameter order, so with both targeted gate_up_proj's factors sit one `base_layer`
deeper: tunemesh's `<experts>.gate_up_proj.lora_A.weight` is PEFT's
`<experts>.base_layer.lora_A.weight`, and `<experts>.down_proj.lora_A.weight` is
`<experts>.lora_A.weight`. tunemesh always targets both, and accepts adapters only with
both (with one, PEFT's keys would no longer say which weight a factor belongs to).
"""

from __future__ import annotations

import dataclasses
import typing
import json
import math
import struct

from tunemesh.errors import InvalidArgumentError

if typing.TYPE_CHECKING:
    import numpy as np

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")

# Module-name suffix -> which LoraConfig switch puts LoRA on it.
TARGET_GROUPS = {
    "q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
    "lm_head": "unembed",
}
# tunemesh's expert-weight module suffix -> PEFT's (see the module docstring).
EXPERT_PEFT_MODULES = {".experts.gate_up_proj": ".experts.base_layer", ".experts.down_proj": ".experts"}
# The `target_parameters` of an expert-LoRA adapter (both, in any order).
EXPERT_TARGET_PARAMETERS = frozenset(m[1:] for m in EXPERT_PEFT_MODULES)
_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
_MAX_HEADER_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT LoRA config tunemesh uses."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    target_parameters: tuple[str, ...] = ()  # () or EXPERT_TARGET_PARAMETERS, sorted


@dataclasses.dataclass(frozen=True)
class TensorHeader:
    """One tensor of a safetensors file (offsets relative to its data section)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int = dataclasses.field(default=0, compare=False)
    end: int = dataclasses.field(default=0, compare=False)


def peft_key(name: str) -> str:
    """`<module>.lora_A.weight` -> PEFT's key."""
    for ours, peft in EXPERT_PEFT_MODULES.items():
        if f"{ours}.lora_" in name:
            name = name.replace(f"{ours}.lora_", f"{peft}.lora_")
            break
    return PEFT_PREFIX + name


def internal_name(key: str) -> str:
    """PEFT's key -> `<module>.lora_A.weight`, or InvalidArgumentError(BAD_ADAPTER_WEIGHTS)."""
    if not key.startswith(PEFT_PREFIX) or not key.endswith(LORA_SUFFIXES):
        raise InvalidArgumentError(
            "BAD_ADAPTER_WEIGHTS",
            f"tensor {key[:200]!r} is not a LoRA factor `{PEFT_PREFIX}<module>.lora_A|lora_B.weight`",
        )
    name = key[len(PEFT_PREFIX):]
    for ours, peft in EXPERT_PEFT_MODULES.items():
        if f"{peft}.lora_" in name:
            return name.replace(f"{peft}.lora_", f"{ours}.lora_")
    return name


def internal_name_of_state(key: str) -> str:
    """PEFT key of an optimizer tensor (`<PEFT key>/<field>`) -> `<internal name>/<field>`."""
    weight_key, sep, field = key.rpartition("/")
    if not sep:
        raise InvalidArgumentError("BAD_OPTIMIZER_STATE", f"optimizer tensor {key[:200]!r} has no field")
    return f"{internal_name(weight_key)}/{field}"


def module_of(name: str) -> str:
    """`<module>.lora_A.weight` -> `<module>`."""
    return name.rsplit(".lora_", 1)[0]


def build_config(base_model: str, rank: int, alpha: float, modules: list[str]) -> dict:
    """A PEFT `adapter_config.json` for LoRA factors on `modules` (full module names;
    `<experts>.gate_up_proj` / `.down_proj` become `target_parameters`)."""
    experts = sorted({m.rsplit(".", 2)[-2] + "." + m.rsplit(".", 1)[-1] for m in modules if is_expert(m)})
    modules = [m for m in modules if not is_expert(m)]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    if experts:
        config["target_parameters"] = experts
    return config


def is_expert(module: str) -> bool:
    """Whether `module` names a fused expert weight (`<experts>.gate_up_proj` / `.down_proj`)."""
    return module.endswith(tuple(EXPERT_PEFT_MODULES))


def parse_config(raw: bytes) -> AdapterConfig:
    """Validate an uploaded `adapter_config.json`: a plain LoRA adapter on linears, and on
    both fused MoE expert weights (`target_parameters`), nothing else."""
    try:
        config = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidArgumentError("BAD_ADAPTER_CONFIG", f"{CONFIG_FILE} is not JSON: {err}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise InvalidArgumentError("BAD_ADAPTER_CONFIG", f"{CONFIG_FILE} must describe a LoRA adapter (peft_type LORA)")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidArgumentError("BAD_ADAPTER_CONFIG", "`r` must be a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha < math.inf:
        raise InvalidArgumentError("BAD_ADAPTER_CONFIG", "`lora_alpha` must be a finite number >= 0")
    for key, allowed in (("use_dora", (False, None)), ("use_rslora", (False, None)), ("bias", ("none", None)),
                         ("fan_in_fan_out", (False, None)), ("modules_to_save", (None, [])),
                         ("rank_pattern", ({}, None)), ("alpha_pattern", ({}, None)),
                         ("layer_replication", (None, [])),
                         ("alora_invocation_tokens", (None, [])), ("trainable_token_indices", (None, [], {})),
                         ("use_qalora", (False, None)), ("lora_bias", (False, None))):
        if config.get(key) not in allowed:
            raise InvalidArgumentError("UNSUPPORTED_ADAPTER_CONFIG", f"{CONFIG_FILE}: {key}={config[key]!r} is not supported")
    parameters = _target_parameters(config.get("target_parameters"))
    targets = config.get("target_modules")
    if targets is None and parameters:
        targets = []  # PEFT writes null for an adapter on expert weights alone
    if isinstance(targets, str) or not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise InvalidArgumentError("UNSUPPORTED_ADAPTER_CONFIG", "`target_modules` must be a list of module names")
    return AdapterConfig(rank, float(alpha), tuple(targets), parameters)


def _target_parameters(value: object) -> tuple[str, ...]:
    """`target_parameters`: none, or exactly both fused expert weights."""
    if value is None or value == []:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise InvalidArgumentError("UNSUPPORTED_ADAPTER_CONFIG", "`target_parameters` must be a list of parameter names")
    wanted = " and ".join(sorted(EXPERT_TARGET_PARAMETERS))
    unknown = sorted(set(value) - EXPERT_TARGET_PARAMETERS)
    if unknown:
        raise InvalidArgumentError("UNSUPPORTED_TARGET_PARAMETER",
                              f"LoRA on parameter {unknown[0][:200]!r} is not supported (only {wanted})")
    if set(value) != EXPERT_TARGET_PARAMETERS:
        raise InvalidArgumentError("UNSUPPORTED_TARGET_PARAMETER",
                              f"`target_parameters` {sorted(value)} must name both {wanted}")
    return tuple(sorted(EXPERT_TARGET_PARAMETERS))


def lora_switches(modules: set[str]) -> dict[str, bool]:
    """Which LoraConfig switches cover LoRA on `modules`; InvalidArgumentError for others."""
    groups = set()
    for module in modules:
        group = "experts" if is_expert(module) else TARGET_GROUPS.get(module.rsplit(".", 1)[-1])
        if group is None:
            raise InvalidArgumentError("UNSUPPORTED_TARGET_MODULE", f"LoRA on {module!r} is not supported")
        groups.add(group)
    return {"train_attn": "attn" in groups, "train_mlp": "mlp" in groups, "train_unembed": "unembed" in groups,
            "train_experts": "experts" in groups}


def read_header(data: bytes) -> dict[str, TensorHeader]:
    """The tensors of a safetensors file, with offsets checked against its size."""
    if len(data) < 8:
        raise InvalidArgumentError("BAD_SAFETENSORS", f"{WEIGHTS_FILE} is too short")
    (size,) = struct.unpack("<Q", bytes(data[:8]))
    if size > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise InvalidArgumentError("BAD_SAFETENSORS", f"{WEIGHTS_FILE} has a bad header length")
    try:
        header = json.loads(bytes(data[8 : 8 + size]))
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgumentError("BAD_SAFETENSORS", f"{WEIGHTS_FILE} header is not JSON") from None
    if not isinstance(header, dict):
        raise InvalidArgumentError("BAD_SAFETENSORS", f"{WEIGHTS_FILE} header is not an object")
    header.pop("__metadata__", None)
    return {key: _tensor_header(key, entry, len(data) - 8 - size) for key, entry in header.items()}


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_header(key: str, entry: object, body_bytes: int) -> TensorHeader:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise InvalidArgumentError("BAD_SAFETENSORS", f"tensor {key[:200]!r} has a malformed entry") from None
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise InvalidArgumentError("BAD_SAFETENSORS", f"tensor {key[:200]!r}: shape must be a list of sizes >= 0")
    shape = tuple(shape)
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise InvalidArgumentError("BAD_SAFETENSORS", f"tensor {key[:200]!r}: dtype {dtype} (use F32, F16 or BF16)")
    count = 1
    for dim in shape:
        count *= dim
    if not (_is_count(begin) and _is_count(end) and begin <= end <= body_bytes
            and end - begin == count * _DTYPE_BYTES[dtype]):
        raise InvalidArgumentError("BAD_SAFETENSORS", f"tensor {key[:200]!r}: offsets do not match its shape")
    return TensorHeader(dtype, shape, begin, end)


def check_factors(tensors: dict[str, TensorHeader], rank: int, target_parameters: tuple[str, ...] = ()) -> set[str]:
    """Check PEFT LoRA factors (A: rank x in, B: out x rank, both per module; on fused
    experts, which need `target_parameters`, A: experts*rank x in, B: out x rank*experts
    with one expert count throughout); return the modules."""
    if not tensors:
        raise InvalidArgumentError("BAD_ADAPTER_WEIGHTS", f"{WEIGHTS_FILE} holds no tensors")
    names = {internal_name(key): header for key, header in tensors.items()}
    modules = {module_of(n) for n in names}
    expert_rows = set()
    for module in sorted(modules):
        a, b = names.get(f"{module}.lora_A.weight"), names.get(f"{module}.lora_B.weight")
        if a is None or b is None:
            raise InvalidArgumentError("BAD_ADAPTER_WEIGHTS", f"{module}: needs both lora_A and lora_B")
        rows = _factor_rows(module, a, b, rank, bool(target_parameters))
        if is_expert(module):
            expert_rows.add(rows)
    if len(expert_rows) > 1:
        raise InvalidArgumentError("BAD_ADAPTER_WEIGHTS", f"expert factors disagree on the expert count ({sorted(expert_rows)} "
                                                     f"rows at r={rank})")
    return modules


def _factor_rows(module: str, a: TensorHeader, b: TensorHeader, rank: int, experts_declared: bool) -> int:
    """A's row count (rank, or rank * experts on fused experts), checked against B and r."""
    expert = is_expert(module)
    if expert and not experts_declared:
        raise InvalidArgumentError("BAD_ADAPTER_WEIGHTS",
                              f"{module}: expert factors need `target_parameters` in {CONFIG_FILE}")
    rows = a.shape[0] if len(a.shape) == 2 else -1
    fits = (rows > 0 and rows % rank == 0) if expert else rows == rank
    if len(b.shape) != 2 or not fits or b.shape[1] != rows:
        shape = "experts*r" if expert else "r"
        raise InvalidArgumentError(
            "BAD_ADAPTER_WEIGHTS",
            f"{module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not match {shape} with r={rank}",
        )
    return rows


def float32_file(tensors: dict[str, "np.ndarray"], metadata: dict[str, str] | None = None) -> list:
    """A safetensors file of float32 arrays as a list of buffers (header, then each
    tensor's bytes in name order), so writers stream it without building one big copy."""
    import numpy as np

    header, offset, parts = {}, 0, []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name], dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        parts.append(memoryview(array).cast("B"))
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return [struct.pack("<Q", len(raw)) + raw, *parts]



def read_float32(data) -> dict[str, "np.ndarray"] | None:
    """The tensors of a safetensors file as float32 arrays viewing `data` (bytes or a
    writable bytearray; no copy), or None when some tensor is not F32."""
    import numpy as np

    tensors = read_header(data)
    if any(t.dtype != "F32" for t in tensors.values()):
        return None
    start = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    return {
        name: np.frombuffer(data, dtype="<f4", count=(t.end - t.begin) // 4, offset=start + t.begin).reshape(t.shape)
        for name, t in tensors.items()
    }
