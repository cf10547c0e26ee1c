"""Engines, adapters and data for the batch-invariance and sampler-equals-trainer tests:
the built-in tiny models (and SmolLM2 where cached), trainer adapters with random non-zero
factors, and the trainer -> PEFT directory step a sampler loads."""

from __future__ import annotations

import contextlib
import os
import pathlib
from unittest import mock

import numpy as np
import pytest

VOCAB = 256  # the tiny models' vocabulary


def tiny_model_dir(kind: str, root: pathlib.Path) -> pathlib.Path:
    from tunemesh_common.models import TINY_DENSE, TINY_MOE, ModelRegistry

    return ModelRegistry.default(root).materialize({"dense": TINY_DENSE, "moe": TINY_MOE}[kind])


def smollm2_dir() -> pathlib.Path:
    from tunemesh_common.models import SMOLLM2, ModelRegistry

    data_dir = pathlib.Path(os.environ.get("TUNEMESH_DATA_DIR", "~/.cache/tunemesh")).expanduser()
    try:
        return ModelRegistry.default(data_dir).materialize(SMOLLM2)
    except Exception as err:  # not cached and not installable offline
        pytest.skip(f"SmolLM2 is not available: {err}")


def datum(seed: int, n: int, vocab: int = VOCAB):
    """A cross-entropy datum of `n` random tokens."""
    from tunemesh_trainer.domain import DatumArrays

    rng = np.random.default_rng(seed)
    return DatumArrays(rng.integers(0, vocab, n), {"target_tokens": rng.integers(0, vocab, n),
                                                    "weights": np.ones(n, np.float32)})


def random_adapter(engine, adapter_id: str, rank: int, seed: int, experts: bool = False) -> None:
    """(Re)create `adapter_id` with random factors (B too: a fresh LoRA's B is zero)."""
    from tunemesh_trainer.domain import AdapterState, LoraSpec

    if adapter_id in engine.adapter_ids():
        engine.delete_adapter(adapter_id)
    spec = LoraSpec(rank=rank, alpha=2.0 * rank, seed=seed, train_experts=experts)
    engine.create_adapter(adapter_id, spec)
    rng = np.random.default_rng(seed)
    weights = {name: rng.normal(0.0, 0.05, tensor.shape).astype(np.float32)
               for name, tensor in engine.adapter(adapter_id).weights().items()}
    engine.import_adapter(adapter_id, AdapterState(spec, weights))


def export_peft(engine, adapter_id: str, directory: pathlib.Path) -> pathlib.Path:
    """The adapter as the PEFT directory a sampler loads (what save_weights_for_sampler writes)."""
    from tunemesh_trainer import checkpoint_files

    return checkpoint_files.write_directory(engine.export_adapter(adapter_id, False), "base", directory)


@contextlib.contextmanager
def base_layers_on(kernel: str):
    """The tiny models' layers lie under `DNN_MIN_WEIGHT`, so their frozen base linears run
    on MKL; "onednn" sends them to oneDNN, as SmolLM2's and larger models' are."""
    from tunemesh_common.numerics import batch_invariant

    threshold = 0 if kernel == "onednn" else batch_invariant.DNN_MIN_WEIGHT
    with mock.patch.object(batch_invariant, "DNN_MIN_WEIGHT", threshold):
        yield
