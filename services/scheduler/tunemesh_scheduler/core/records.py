"""Plain records the scheduler core keeps in memory and hands to the server layer.

Records returned by `SchedulerCore` are live objects: callers read them (e.g. to encode
a proto) and must not mutate them. Times are epoch seconds (float) from the core's clock.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Any

from tunemesh.errors import Code, TunemeshError


if TYPE_CHECKING:
    from tunemesh.v1.types_pb2 import LoraConfig
    from tunemesh_scheduler.core.work import LoadRequest, Work

class OpKind(enum.StrEnum):
    """What an operation asks a trainer to do."""

    FORWARD = "FORWARD"
    FORWARD_BACKWARD = "FORWARD_BACKWARD"
    OPTIM_STEP = "OPTIM_STEP"
    SAVE_STATE = "SAVE_STATE"
    SAVE_SAMPLER = "SAVE_SAMPLER"
    LOAD_STATE = "LOAD_STATE"


# Kinds merged across runs into one `run_batch` call (the trainer fuses the forward
# kinds into one pass and applies the optimizer steps after it); the rest run one by one.
BATCHABLE_KINDS = frozenset({OpKind.FORWARD, OpKind.FORWARD_BACKWARD, OpKind.OPTIM_STEP})

# Kinds that change the run's adapter: a move replays those that succeeded after the
# run's snapshot, so their calls are kept until a snapshot covers them.
STATEFUL_KINDS = frozenset({OpKind.FORWARD_BACKWARD, OpKind.OPTIM_STEP, OpKind.LOAD_STATE})


class OpState(enum.StrEnum):
    """Lifecycle of an operation (mirrors tunemesh.v1.OperationState)."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def done(self) -> bool:
        return self in _DONE_STATES


_DONE_STATES = frozenset({OpState.SUCCEEDED, OpState.FAILED, OpState.CANCELLED})


@dataclasses.dataclass(frozen=True, slots=True)
class OperationError:
    """Failure of one operation, in wire form (google.rpc code, REASON, message)."""

    code: int
    reason: str
    message: str

    @classmethod
    def of(cls, error: TunemeshError) -> OperationError:
        """Convert a typed error into its wire form."""
        return cls(int(error.rpc_code), error.reason, error.message)

    @property
    def retryable(self) -> bool:
        return self.code == Code.UNAVAILABLE


@dataclasses.dataclass(slots=True)
class SessionRecord:
    """A client session (`sessions/{id}`) owned by one tenant."""

    name: str
    tenant: str
    labels: dict[str, str]
    create_time: float
    last_heartbeat_time: float
    ended: bool = False


@dataclasses.dataclass(slots=True)
class RunRecord:
    """A LoRA training run (`runs/{id}`); `last_seq_id` is the highest seq_id such
    that every operation 1..last_seq_id is done; `step` counts successful optim steps."""

    name: str
    tenant: str
    session: str
    base_model: str
    lora: LoraConfig  # normalized by the server
    node_id: str
    create_time: float
    step: int = 0
    last_seq_id: int = 0
    epoch: int = 1  # fencing: raised by every scheduler or trainer that takes the run over
    request_id: str = ""  # of the CreateTrainingRun call
    origin: LoadRequest | None = None  # the checkpoint the run was created from, if any
    snapshot_path: str = ""  # latest automatic snapshot (weights + AdamW state)
    snapshot_seq_id: int = 0  # the seq_id that snapshot follows
    user_metadata: tuple[tuple[str, str], ...] = ()  # the caller's notes, sorted by key
    # (last_seq_id, step) as the store keeps them: moved on only when the operation log
    # below is compacted, so it never runs ahead of the logged operations.
    floor: tuple[int, int] = (0, 0)
    # when its latest operation was accepted (0: none yet); not stored: a takeover takes the
    # latest of the logged operations' times
    last_request_time: float = 0.0


@dataclasses.dataclass(slots=True)
class OperationRecord:
    """A queued unit of work (`operations/{id}`) and, once done, its outcome.

    `payload` is the work asked (`core.work`: the core carries it without looking inside)
    and is dropped once the operation is done; `result` is what the trainer port returned.
    """

    name: str
    tenant: str
    run: str
    seq_id: int
    kind: OpKind
    request_id: str
    payload_digest: bytes | str
    num_tokens: int
    node_id: str
    create_time: float
    state: OpState = OpState.QUEUED
    end_time: float | None = None
    result: Any = None
    error: OperationError | None = None
    payload: Work | None = dataclasses.field(default=None, repr=False)
    epoch: int = 0  # the run's epoch it is sent with
    snapshot_path: str = ""  # OPTIM_STEP: snapshot the adapter right after it, to this path
    ticket: int = 0  # the journal ticket of its submission (0: stored already, or no store)

    @property
    def done(self) -> bool:
        return self.state.done
