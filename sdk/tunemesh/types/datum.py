"""Datum: one training example."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from tunemesh.types.model_input import ModelInput
from tunemesh.types.provenance_spans import ProvenanceSpans, check_tiling
from tunemesh.types.tensor_data import LossFnInput, to_tensor_data


@dataclasses.dataclass
class Datum:
    """One example: a model input and the named tensors its loss reads.

    Lists are converted by key (`target_tokens` -> int64; `weights`, `advantages`,
    `logprobs`, ... -> float32); numpy arrays and torch tensors keep their kind.
    The provenance spans (set both or neither, with `with_provenance`) are Tinker's;
    tunemesh refuses to send a datum that has them.
    """

    model_input: ModelInput
    loss_fn_inputs: Mapping[str, LossFnInput] = dataclasses.field(default_factory=dict)
    model_input_spans: ProvenanceSpans | None = None
    loss_fn_input_spans: ProvenanceSpans | None = None

    def __post_init__(self) -> None:
        self.loss_fn_inputs = {
            str(key): to_tensor_data(key, value) for key, value in self.loss_fn_inputs.items()
        }
        if (self.model_input_spans is None) != (self.loss_fn_input_spans is None):
            raise ValueError("provenance comes as a pair: set both span lists or neither")

    def with_provenance(self, model_input: ProvenanceSpans, loss_fn_inputs: ProvenanceSpans) -> Datum:
        """A copy carrying provenance: `model_input` spans tile the input tokens,
        `loss_fn_inputs` spans tile `target_tokens` (checked here)."""
        check_tiling("model_input", model_input, self.model_input.length)
        targets = self.loss_fn_inputs.get("target_tokens")
        if targets is not None and len(targets.shape) == 1:
            check_tiling("loss_fn_inputs", loss_fn_inputs, targets.shape[0])
        return dataclasses.replace(
            self, model_input_spans=list(model_input), loss_fn_input_spans=list(loss_fn_inputs)
        )
