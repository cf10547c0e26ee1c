"""Trainer logic above the engine: slot capacity, serial execution, node description.

Engine calls run one at a time on a dedicated worker thread: torch state is not shared
across threads, and the event loop stays free to answer health checks and info calls.
Within one call the engine may use threads of its own (lanes), and a batch's optimizer
steps of different adapters may run side by side where the engine allows it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Sequence

from tunemesh.errors import Code, ResourceExhaustedError, TunemeshError
from tunemesh_trainer.metrics import TrainerMetrics
from tunemesh_trainer.domain import (
    AdamSpec, AdapterState, EngineItem, ItemFailure, ItemOutcome, LoraSpec, ModelInfo, OptimItem,
)

log = logging.getLogger(__name__)


class TrainerCore:
    """Owns one engine; every engine call goes through the single worker thread."""

    def __init__(self, engine, max_adapters: int, metrics: TrainerMetrics | None = None) -> None:
        self._engine = engine
        self.max_adapters = max_adapters
        self._metrics = metrics or TrainerMetrics()
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        # A batch's optimizer steps of different adapters run at once where the engine says
        # they may (`adapter_threads`: AdamW and the snapshot copy of one adapter touch nothing
        # of another's), from the engine thread, which waits for them all
        threads = getattr(engine, "adapter_threads", 1)
        self._steps = (concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="steps")
                       if threads > 1 else None)
        self._creating: set[str] = set()

    @property
    def info(self) -> ModelInfo:
        return self._engine.info

    def adapter_count(self) -> int:
        return len(self._engine.adapter_ids())

    def _reserve_slot(self, adapter_id: str) -> None:
        """Claim a slot before the engine call, so concurrent creates cannot overfill."""
        held = set(self._engine.adapter_ids()) | self._creating
        if adapter_id not in held and len(held) >= self.max_adapters:
            raise ResourceExhaustedError("NO_ADAPTER_SLOT", f"all {self.max_adapters} adapter slots are in use")
        self._creating.add(adapter_id)

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def create_adapter(self, adapter_id: str, spec: LoraSpec) -> int:
        self._reserve_slot(adapter_id)
        try:
            count = await self._call(self._engine.create_adapter, adapter_id, spec)
        finally:
            self._creating.discard(adapter_id)
        self._metrics.adapter_loaded("new")
        log.info("adapter %s created (rank %d, %d parameters)", adapter_id, spec.rank, count)
        return count

    async def restore_adapter(self, adapter_id: str, spec: LoraSpec, state: AdapterState | None) -> int:
        """The adapter as of `state` (None: fresh), replacing any copy this node holds, in
        one engine-thread call: a run moving here waits for one batch boundary, not three.
        Returns its optimizer step count. On failure the node holds no copy at all."""
        held = self.holds(adapter_id)
        self._reserve_slot(adapter_id)
        try:
            steps = await self._call(self._restore, adapter_id, spec, state)
        except BaseException:
            if held:
                self._metrics.adapter_unloaded()
            raise
        finally:
            self._creating.discard(adapter_id)
        if held:
            self._metrics.adapter_unloaded()
        self._metrics.adapter_loaded("new" if state is None else "checkpoint")
        log.info("adapter %s restored (rank %d, optimizer step %d)", adapter_id, spec.rank, steps)
        return steps

    def holds(self, adapter_id: str) -> bool:
        return adapter_id in self._engine.adapter_ids()

    def _restore(self, adapter_id: str, spec: LoraSpec, state: AdapterState | None) -> int:
        if adapter_id in self._engine.adapter_ids():
            self._engine.delete_adapter(adapter_id)
        self._engine.create_adapter(adapter_id, spec)
        if state is None:
            return 0
        try:
            return self._engine.import_adapter(adapter_id, state)
        except BaseException:
            self._engine.delete_adapter(adapter_id)  # no half-restored adapter stays
            raise

    async def delete_adapter(self, adapter_id: str) -> None:
        await self._call(self._engine.delete_adapter, adapter_id)
        self._metrics.adapter_unloaded()
        log.info("adapter %s deleted", adapter_id)

    async def run_batch(
        self, items: Sequence[EngineItem], optims: Sequence[OptimItem] = ()
    ) -> tuple[list[ItemOutcome], float]:
        """The fused pass over `items`, then each optimizer step, in one engine-thread call."""
        start = time.perf_counter()
        outcomes = await self._call(self._execute, list(items), list(optims))
        seconds = time.perf_counter() - start
        self._count(items, optims, seconds)
        return outcomes, seconds

    def _count(self, items: Sequence[EngineItem], optims: Sequence[OptimItem], seconds: float) -> None:
        tokens: collections.Counter[str] = collections.Counter()
        counts: collections.Counter[str] = collections.Counter()
        for item in items:
            tokens[item.kind.value] += item.num_tokens
            counts[item.kind.value] += 1
        if optims:
            counts["optim_step"] = len(optims)
        self._metrics.step(seconds, tokens, counts)

    def _execute(self, items: list[EngineItem], optims: list[OptimItem]) -> list[ItemOutcome]:
        outcomes = self._engine.run_batch(items) if items else []
        apart = len({optim.adapter_id for optim in optims}) == len(optims) > 1
        steps = self._steps.map(self._step, optims) if self._steps is not None and apart else map(self._step, optims)
        return outcomes + list(steps)

    def _step(self, optim: OptimItem) -> ItemOutcome:
        outcome = ItemOutcome(item_id=optim.item_id)
        try:
            outcome.metrics = self._engine.optim_step(optim.adapter_id, optim.adam)
            if optim.snapshot:  # between this step and the next call: gradients are clear
                outcome.snapshot = self._engine.export_adapter(optim.adapter_id, True)
        except TunemeshError as err:
            outcome.failure = ItemFailure(int(err.rpc_code), err.reason, err.message)
        except Exception:  # an engine bug fails this step alone, never the batch
            log.exception("optimizer step of %s failed", optim.adapter_id)
            outcome.failure = ItemFailure(int(Code.INTERNAL), "ENGINE_ERROR", "the optimizer step failed")
        return outcome

    async def export_adapter(self, adapter_id: str, with_optimizer: bool) -> AdapterState:
        """A snapshot taken between batches, so it never sees half a step."""
        return await self._call(self._engine.export_adapter, adapter_id, with_optimizer)

    async def import_adapter(self, adapter_id: str, state: AdapterState) -> int:
        steps = await self._call(self._engine.import_adapter, adapter_id, state)
        self._metrics.adapter_loaded("checkpoint")
        log.info("adapter %s loaded (optimizer step %d)", adapter_id, steps)
        return steps

    async def optim_step(self, adapter_id: str, adam: AdamSpec) -> dict[str, float]:
        return await self._call(self._engine.optim_step, adapter_id, adam)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
        if self._steps is not None:
            self._steps.shutdown(wait=False, cancel_futures=True)
