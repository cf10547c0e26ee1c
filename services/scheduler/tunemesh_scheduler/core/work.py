"""What an operation asks of its run's trainer: one variant per kind of work.

`Work` is a tagged union; the server builds the variant from a validated public request,
the core carries it without looking inside (it decides on the operation's `OpKind`), and
the trainer port and the durable codec each `match` on it. The data and the AdamW
hyperparameters stay the wire messages they arrived as (`tunemesh.v1.Datum`,
`tunemesh.v1.AdamParams`), already validated: the trainer takes them as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from tunemesh_scheduler.core.records import OpKind

if TYPE_CHECKING:  # wire messages only, carried through; the core never builds or reads one
    from tunemesh.v1.types_pb2 import AdamParams, Datum


@dataclasses.dataclass(frozen=True, slots=True)
class DataWork:
    """FORWARD (`backward` false) or FORWARD_BACKWARD: data through the adapter, a loss."""

    data: Sequence[Datum]
    loss_fn: str
    loss_fn_config: Mapping[str, float]
    backward: bool


@dataclasses.dataclass(frozen=True, slots=True)
class StepWork:
    """OPTIM_STEP: one AdamW step of the adapter's accumulated gradients."""

    adam: AdamParams


@dataclasses.dataclass(frozen=True, slots=True)
class SaveRequest:
    """SAVE_STATE (with the optimizer state) or SAVE_SAMPLER: write the adapter as a new
    checkpoint at `path`."""

    path: str
    include_optimizer_state: bool
    ttl_seconds: int = 0
    user_metadata: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class LoadRequest:
    """LOAD_STATE: overwrite the adapter from the checkpoint at `path`."""

    path: str
    load_optimizer_state: bool


Work = DataWork | StepWork | SaveRequest | LoadRequest


def kind_of(work: Work) -> OpKind:
    """The operation kind a piece of work is."""
    match work:
        case DataWork(backward=True):
            return OpKind.FORWARD_BACKWARD
        case DataWork():
            return OpKind.FORWARD
        case StepWork():
            return OpKind.OPTIM_STEP
        case SaveRequest(include_optimizer_state=True):
            return OpKind.SAVE_STATE
        case SaveRequest():
            return OpKind.SAVE_SAMPLER
        case LoadRequest():
            return OpKind.LOAD_STATE
    raise TypeError(f"not a kind of work: {type(work).__name__}")
