"""Fake ports and helpers for the scheduler core tests."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from typing import Any

from tunemesh.errors import NotFoundError
from tunemesh_scheduler.core import BatchItem, ItemOutcome, OpKind, SchedulerConfig, SchedulerCore
from tunemesh_scheduler.core.ports import Fence
from tunemesh_scheduler.core.work import LoadRequest


class FakePlacement:
    """Places runs of known models on `self.node`."""

    def __init__(self, models: tuple[str, ...] = ("tiny",), node: str = "node-a") -> None:
        self.models = models
        self.node = node  # where the next run goes; tests change it
        self.placed: list[tuple[str, str]] = []
        self.released: list[tuple[str, str]] = []
        self.error: Exception | None = None
        self.move_error: Exception | None = None  # every move raises it while set
        self.move_hold: asyncio.Event | None = None  # moves wait for it
        self.move_attempts: list[tuple[str, str]] = []  # (run, from_node), failed ones too

    async def place(self, run_name: str, base_model: str) -> str:
        await asyncio.sleep(0)
        if self.error is not None:
            raise self.error
        if base_model not in self.models:
            raise NotFoundError("UNKNOWN_MODEL", base_model)
        self.placed.append((run_name, self.node))
        return self.node

    async def release(self, run_name: str, node_id: str) -> None:
        self.released.append((run_name, node_id))

    async def move(self, run_name: str, base_model: str, from_node: str) -> str:
        self.move_attempts.append((run_name, from_node))
        if self.move_hold is not None:
            await self.move_hold.wait()
        if self.move_error is not None:
            raise self.move_error
        self.moved = [*getattr(self, "moved", []), (run_name, from_node, self.node)]
        return self.node


class FakeTrainer:
    """Records every call; `hold` (an Event) blocks calls until set; per-node errors."""

    def __init__(self) -> None:
        self.adapters: list[tuple[str, str]] = []
        self.batches: list[tuple[str, list[BatchItem]]] = []
        self.executed: list[tuple[str, OpKind, Any]] = []  # (run, kind, payload) in order
        self.hold: asyncio.Event | None = None
        self.batch_error: dict[str, Exception] = {}
        self.item_errors: dict[Any, ItemOutcome] = {}  # payload -> outcome
        self.adapter_error: Exception | None = None
        self.adapter_hold: asyncio.Event | None = None  # create_adapter waits for it
        self.adapter_errors: dict[str, Exception] = {}  # run -> create_adapter raises it
        self.short_answer = False
        self.epochs: dict[str, int] = {}  # run -> epoch of its adapter
        self.applied: dict[str, int] = {}  # run -> highest seq_id executed
        # (node, run, kind, fence, payload) of every batch item executed and every load,
        # in order (a load's kind is LOAD_STATE, its payload the LoadRequest)
        self.trace: list[tuple[str, str, OpKind, Fence, Any]] = []
        self.node_hold: dict[str, asyncio.Event] = {}  # node -> its batches wait for it
        self.once_item_errors: dict[tuple[str, Any], ItemOutcome] = {}  # (node, payload), used once
        self.snapshot_hold: asyncio.Event | None = None  # await_snapshot waits for it
        self.snapshot_errors: dict[int, Exception] = {}  # seq_id -> await_snapshot raises it
        self.snapshot_calls: list[tuple[str, str, int]] = []  # every await_snapshot, failed ones too
        self.load_hold: asyncio.Event | None = None  # load_adapter waits for it
        self.load_step = 0  # what load_adapter answers
        self.loads: list[tuple[str, str, str, Any, Fence]] = []  # (node, run, tenant, request, fence)

    async def create_adapter(self, node_id: str, run_name: str, base_model: str, lora: Any, epoch: int = 0) -> None:
        if self.adapter_hold is not None:
            await self.adapter_hold.wait()
        if self.adapter_error is not None:
            raise self.adapter_error
        if run_name in self.adapter_errors:
            raise self.adapter_errors[run_name]
        self.adapters.append((node_id, run_name))
        self.epochs[run_name] = epoch

    async def restore_adapter(self, node_id: str, run_name: str, base_model: str, lora: Any, epoch: int,
                              tenant: str, start: LoadRequest | None) -> int:
        """Recorded as the calls it stands for: the stale copy deleted, created, loaded."""
        await self.delete_adapter(node_id, run_name)
        await self.create_adapter(node_id, run_name, base_model, lora, epoch)
        if start is None:
            return 0
        return await self.load_adapter(node_id, run_name, tenant, start, Fence(0, epoch))

    async def adopt_adapter(self, node_id: str, run_name: str, epoch: int) -> int:
        if (node_id, run_name) not in self.adapters:
            raise NotFoundError("ADAPTER_NOT_FOUND", run_name)
        self.epochs[run_name] = epoch
        return self.applied.get(run_name, 0)

    async def list_adapters(self, node_id: str) -> list[str]:
        return [run for node, run in self.adapters if node == node_id]

    async def load_adapter(self, node_id: str, run_name: str, tenant: str, request: LoadRequest,
                           fence: Fence = Fence()) -> int:
        self.loads.append((node_id, run_name, tenant, request, fence))
        if self.load_hold is not None:
            await self.load_hold.wait()
        self.trace.append((node_id, run_name, OpKind.LOAD_STATE, fence, request))
        return self.load_step

    async def await_snapshot(self, node_id: str, run_name: str, seq_id: int) -> None:
        self.snapshot_calls.append((node_id, run_name, seq_id))
        if self.snapshot_hold is not None:
            await self.snapshot_hold.wait()
        if seq_id in self.snapshot_errors:
            raise self.snapshot_errors[seq_id]
        self.snapshots = [*getattr(self, "snapshots", []), (node_id, run_name, seq_id)]

    async def delete_checkpoint(self, tenant: str, path: str) -> None:
        self.deleted_checkpoints = [*getattr(self, "deleted_checkpoints", []), (tenant, path)]

    async def checkpoint_exists(self, tenant: str, path: str) -> bool:
        """Whether `path` is in `stored` (paths the checkpoint service holds; none by default)."""
        return path in getattr(self, "stored", ())

    async def delete_adapter(self, node_id: str, run_name: str) -> None:
        self.deleted = [*getattr(self, "deleted", []), (node_id, run_name)]

    async def run_batch(self, node_id: str, items: list[BatchItem]) -> list[ItemOutcome]:
        self.batches.append((node_id, list(items)))
        if self.hold is not None:
            await self.hold.wait()
        if node_id in self.node_hold:
            await self.node_hold[node_id].wait()
        if node_id in self.batch_error:
            raise self.batch_error[node_id]
        outcomes = []
        for item in items:
            self.executed.append((item.run_name, item.kind, item.payload))
            self.applied[item.run_name] = max(self.applied.get(item.run_name, 0), item.fence.seq_id)
            self.trace.append((node_id, item.run_name, item.kind, item.fence, item.payload))
            ok = ItemOutcome(result=("ok", item.payload))
            once = self.once_item_errors.pop((node_id, item.payload), None)
            outcomes.append(once or self.item_errors.get(item.payload, ok))
        return outcomes[:-1] if self.short_answer else outcomes



@dataclasses.dataclass
class Mesh:
    """A core wired to fake ports, with shortcuts for tests."""

    core: SchedulerCore
    placement: FakePlacement
    trainer: FakeTrainer
    now: list[float] = dataclasses.field(default_factory=lambda: [1000.0])  # the core's clock

    async def advance(self, seconds: float) -> None:
        """Move the core's clock on and let it act on the time (gap deadlines, ...)."""
        self.now[0] += seconds
        self.core.tick()
        await settle()

    async def new_run(self, tenant: str = "t1", node: str = "node-a") -> str:
        """Open a session for `tenant` and create a run placed on `node`."""
        self.placement.node = node
        session = self.core.create_session(tenant)
        run = await self.core.create_run(tenant, session.name, "tiny", {"rank": 8})
        return run.name

    async def submit(self, run: str, seq: int, tenant: str = "t1", *, tokens: int = 10,
                     kind: OpKind = OpKind.FORWARD_BACKWARD, payload: Any = None,
                     request_id: str = ""):
        """Submit a call whose payload (and digest) defaults to (run, seq)."""
        payload = (run, seq) if payload is None else payload
        return await self.core.submit(
            tenant, run, seq, request_id, kind, payload, repr(payload), tokens
        )

    async def wait_all(self, ops, timeout_s: float = 5.0) -> None:
        for op in ops:
            await self.core.wait_operation(op.tenant, op.name, timeout_s)
            assert op.done, op


async def make_mesh(**config: Any) -> Mesh:
    """A started core with fake ports (call inside a running loop)."""
    counter = itertools.count(1)
    placement, trainer, now = FakePlacement(), FakeTrainer(), [1000.0]
    core = SchedulerCore(
        placement, trainer, SchedulerConfig(**config),
        clock=lambda: now[0], new_id=lambda: f"id{next(counter)}",
    )
    await core.start()
    return Mesh(core, placement, trainer, now)


async def settle(rounds: int = 20) -> None:
    """Let the event loop run queued callbacks and tasks."""
    for _ in range(rounds):
        await asyncio.sleep(0)
