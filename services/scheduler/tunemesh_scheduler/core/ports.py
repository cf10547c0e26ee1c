"""What the core needs from the outside world, as Protocols the server layer implements.

`PlacementPort` is backed by etcd (revision-checked placement), `TrainerPort` by the
internal gRPC TrainerService. Ports raise typed `tunemesh.errors` exceptions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

from tunemesh_scheduler.core.records import (
    OperationError, OperationRecord, OpKind, RunRecord, SessionRecord,
)
from tunemesh_scheduler.core.work import LoadRequest, SaveRequest, Work



@dataclasses.dataclass(frozen=True, slots=True)
class Fence:
    """Where an operation stands in its run: the trainer applies a (run, seq_id) once and
    refuses calls of an epoch below the run's current one."""

    seq_id: int = 0
    epoch: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotTarget:
    """Where an automatic snapshot of a run's adapter is written."""

    path: str
    tenant: str


@dataclasses.dataclass(frozen=True, slots=True)
class BatchItem:
    """One forward/forward_backward call in a fused batch (maps to internal BatchItem)."""

    op_name: str  # echoed as item_id
    run_name: str  # the adapter id on the trainer
    kind: OpKind  # FORWARD, FORWARD_BACKWARD or OPTIM_STEP
    payload: Work  # DataWork or StepWork
    num_tokens: int
    fence: Fence = Fence()  # the op's (seq_id, epoch); the default is unfenced
    snapshot: SnapshotTarget | None = None  # OPTIM_STEP: snapshot the adapter right after


@dataclasses.dataclass(frozen=True, slots=True)
class ItemOutcome:
    """Outcome of one batch item: exactly one of `result` or `error` is meaningful."""

    result: Any = None
    error: OperationError | None = None
    epoch: int = 0  # the run epoch the call was sent with (set by the dispatcher)


@dataclasses.dataclass(frozen=True, slots=True)
class LoadResult:
    """A finished load: the run's optimizer step count afterwards."""

    path: str
    step: int


class PlacementPort(Protocol):
    """Chooses (and durably records) the trainer node for a run."""

    async def place(self, run_name: str, base_model: str) -> str:
        """Return the node id for a new run.

        Raises NotFoundError(UNKNOWN_MODEL), ResourceExhaustedError(NO_CAPACITY) or UnavailableError.
        """
        ...

    async def release(self, run_name: str, node_id: str) -> None:
        """Undo `place` (called when the adapter could not be created)."""
        ...

    async def move(self, run_name: str, base_model: str, from_node: str) -> str:
        """Re-place a run whose trainer is gone (or lost its adapter): a live trainer of
        the model with a free slot, `from_node` only when no other one can take it.
        Raises ResourceExhaustedError(NO_CAPACITY) or UnavailableError; the caller retries."""
        ...


class TrainerPort(Protocol):
    """Calls into trainer nodes."""

    async def create_adapter(
        self, node_id: str, run_name: str, base_model: str, lora: Any, epoch: int = 0
    ) -> None:
        """Create the run's adapter slot on the node, fenced at `epoch`."""
        ...

    async def delete_adapter(self, node_id: str, run_name: str) -> None:
        """Free the run's adapter slot (undo of a failed create)."""
        ...

    async def save_adapter(
        self, node_id: str, run_name: str, tenant: str, request: SaveRequest, fence: Fence = Fence()
    ) -> Any:
        """Write the run's adapter to the checkpoint service; returns the checkpoint."""
        ...

    async def load_adapter(
        self, node_id: str, run_name: str, tenant: str, request: LoadRequest, fence: Fence = Fence()
    ) -> int:
        """Load a checkpoint of `tenant` into the run's adapter; returns its step count."""
        ...

    async def restore_adapter(self, node_id: str, run_name: str, base_model: str, lora: Any, epoch: int,
                              tenant: str, start: LoadRequest | None) -> int:
        """Rebuild the run's adapter on the node at `epoch`, replacing any copy it holds,
        loaded from checkpoint `start` of `tenant` (None: fresh); returns its step count."""
        ...

    async def adopt_adapter(self, node_id: str, run_name: str, epoch: int) -> int:
        """Raise the adapter's epoch (fencing off older callers); returns the highest
        seq_id it has taken. NotFoundError when the node has no such adapter."""
        ...

    async def list_adapters(self, node_id: str) -> list[str]:
        """The adapter ids on a node."""
        ...

    async def await_snapshot(self, node_id: str, run_name: str, seq_id: int) -> None:
        """Return once the snapshot taken after optimizer step `seq_id` is written."""
        ...

    async def delete_checkpoint(self, tenant: str, path: str) -> None:
        """Delete a checkpoint of `tenant` (a superseded snapshot); NotFoundError if gone."""
        ...

    async def checkpoint_exists(self, tenant: str, path: str) -> bool:
        """Whether the checkpoint service holds `path` of `tenant` (a snapshot whose
        confirmation did not come)."""
        ...

    async def run_batch(self, node_id: str, items: Sequence[BatchItem]) -> Sequence[ItemOutcome]:
        """Execute items of different runs (forward kinds as one fused pass, then optimizer
        steps); one outcome per item, in order. Raising fails every item of the batch with
        the error (UNAVAILABLE: node down)."""
        ...


@dataclasses.dataclass(slots=True)
class StoredState:
    """What a `RunStore` holds: every session, run and logged operation."""

    sessions: list[SessionRecord] = dataclasses.field(default_factory=list)
    runs: list[RunRecord] = dataclasses.field(default_factory=list)
    operations: list[OperationRecord] = dataclasses.field(default_factory=list)
    payloads: dict[tuple[str, int], Work] = dataclasses.field(default_factory=dict)  # (run, seq_id)
    sampling_sessions: list[Any] = dataclasses.field(default_factory=list)  # SamplingSessionRecord


@dataclasses.dataclass(frozen=True, slots=True)
class StoreWrite:
    """One change to durable state: put a record, or delete it (`delete=True`); with
    `payload`, also keep a new operation's call; with `drop_call` (a finished operation
    that no replay needs), drop its kept call; with `trim_through` (a run), drop the
    run's kept calls up to that seq_id (a snapshot covers them). A `deferrable` change
    nobody waits for (a finish, an eviction) may wait for the next other change or the
    journal's `defer_s`, so it shares that change's transaction (core/journal.py)."""

    record: SessionRecord | RunRecord | OperationRecord
    delete: bool = False
    payload: Work | None = None
    drop_call: bool = False
    trim_through: int = 0
    deferrable: bool = False


class RunStore(Protocol):
    """Durable control state (etcd in the mesh, memory in unit tests).

    `apply` writes changes in order; operation records carry their result once they
    succeeded, and calls are kept apart until trimmed. Raises UnavailableError when the store
    cannot be reached (the journal retries).
    """

    async def apply(self, writes: Sequence[StoreWrite]) -> None:
        ...

    async def load(self) -> StoredState:
        ...

    async def payloads(self, run_name: str, after_seq_id: int) -> dict[int, Work]:
        """The run's kept calls with seq_id > `after_seq_id`, by seq_id."""
        ...
