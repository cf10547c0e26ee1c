"""AdapterState <-> the files of a checkpoint: a PEFT adapter directory plus, for state
checkpoints, `optimizer.safetensors` (AdamW moments and steps, keyed by PEFT tensor key)."""

from __future__ import annotations

import json
import pathlib
import struct

import numpy as np

from tunemesh_common.lora import peft_format
from tunemesh.errors import InvalidArgumentError
from tunemesh_trainer.domain import AdapterState, LoraSpec

OPTIMIZER_FORMAT = "tunemesh-adamw-1"


def encode(state: AdapterState, base_model: str) -> dict[str, list]:
    """The checkpoint files of `state` (float32, exact), each as a list of buffers that
    view the state's arrays: nothing is copied until the bytes are sent."""
    modules = sorted({peft_format.module_of(n) for n in state.weights})
    config = peft_format.build_config(base_model, state.spec.rank, state.spec.alpha, modules)
    files = {
        peft_format.CONFIG_FILE: [(json.dumps(config, indent=2, sort_keys=True) + "\n").encode()],
        peft_format.WEIGHTS_FILE: peft_format.float32_file({peft_format.peft_key(n): a for n, a in state.weights.items()}),
    }
    if state.optimizer is not None:
        tensors = {peft_format.peft_key(k): a for k, a in state.optimizer.items()}
        metadata = {"format": OPTIMIZER_FORMAT, "steps": str(state.steps)}
        files[peft_format.OPTIMIZER_FILE] = peft_format.float32_file(tensors, metadata)
    return files


def write_directory(state: AdapterState, base_model: str, directory: pathlib.Path) -> pathlib.Path:
    """`state`'s checkpoint files written into `directory` (created): a PEFT adapter
    directory that a sampler loads (plus the optimizer file when the state has one)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, parts in encode(state, base_model).items():
        (directory / name).write_bytes(b"".join(bytes(part) for part in parts))
    return directory


def decode(files: dict[str, bytes], spec: LoraSpec, with_optimizer: bool) -> AdapterState:
    """Weights (any float dtype, widened to float32) and, if asked, optimizer state.
    Float32 files (all of tunemesh's own) are read as views of the file bytes."""
    weights = {peft_format.internal_name(k): a for k, a in _float_tensors(files[peft_format.WEIGHTS_FILE]).items()}
    if not with_optimizer:
        return AdapterState(spec, weights)
    raw = files.get(peft_format.OPTIMIZER_FILE)
    if raw is None:
        raise InvalidArgumentError("NO_OPTIMIZER_STATE", "the checkpoint holds no optimizer state")
    steps = _optimizer_steps(raw)
    optimizer = {peft_format.internal_name_of_state(k): a for k, a in _float_tensors(raw).items()}
    return AdapterState(spec, weights, optimizer, steps)


def _float_tensors(data) -> dict[str, np.ndarray]:
    tensors = peft_format.read_float32(data)
    if tensors is not None:
        return tensors
    from safetensors.torch import load  # F16 / BF16 (imported adapters): widen via torch

    try:
        return {k: t.float().numpy() for k, t in load(bytes(data)).items()}
    except Exception as err:  # safetensors raises its own error types for corrupt bytes
        raise InvalidArgumentError("BAD_SAFETENSORS", f"cannot read {peft_format.WEIGHTS_FILE}: {err}") from None


def _optimizer_steps(raw) -> int:
    (size,) = struct.unpack("<Q", bytes(raw[:8]))
    metadata = json.loads(bytes(raw[8 : 8 + size])).get("__metadata__") or {}
    if metadata.get("format") != OPTIMIZER_FORMAT:
        raise InvalidArgumentError("BAD_OPTIMIZER_STATE", f"optimizer state is not {OPTIMIZER_FORMAT}")
    return int(metadata["steps"])
