"""TrainerCore records step time, tokens and items by kind, and adapter slot changes; a
batch's optimizer steps of different adapters run side by side where the engine allows."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
from prometheus_client import CollectorRegistry

from tunemesh_trainer.metrics import TrainerMetrics
from tunemesh_trainer.core import TrainerCore
from tunemesh_trainer.domain import AdamSpec, AdapterState, DatumArrays, EngineItem, ItemKind, ItemOutcome
from tunemesh_trainer.domain import LoraSpec, OptimItem


class _Engine:
    """Just enough of a TrainingEngine: slots and outcomes, no compute."""

    def __init__(self) -> None:
        self.slots: set[str] = set()

    def adapter_ids(self) -> list[str]:
        return sorted(self.slots)

    def create_adapter(self, adapter_id: str, spec: LoraSpec) -> int:
        self.slots.add(adapter_id)
        return 10

    def delete_adapter(self, adapter_id: str) -> None:
        self.slots.discard(adapter_id)

    def import_adapter(self, adapter_id: str, state: AdapterState) -> int:
        return state.steps

    def run_batch(self, items):
        return [ItemOutcome(item_id=item.item_id) for item in items]

    def optim_step(self, adapter_id: str, adam: AdamSpec) -> dict[str, float]:
        return {}


def _item(item_id: str, kind: ItemKind, lengths: list[int]) -> EngineItem:
    data = [DatumArrays(np.zeros(n, dtype=np.int64), {}) for n in lengths]
    return EngineItem(item_id, "run-a", kind, data)


def test_a_batch_records_its_engine_time_tokens_and_items_by_kind():
    registry = CollectorRegistry()
    core = TrainerCore(_Engine(), 4, TrainerMetrics(registry))
    items = [_item("1", ItemKind.FORWARD_BACKWARD, [5, 7]), _item("2", ItemKind.FORWARD, [3])]
    _, seconds = asyncio.run(core.run_batch(items, [OptimItem("3", "run-a", AdamSpec())]))
    core.close()
    get = registry.get_sample_value
    assert get("tunemesh_trainer_tokens_total", {"kind": "forward_backward"}) == 12
    assert get("tunemesh_trainer_tokens_total", {"kind": "forward"}) == 3
    assert get("tunemesh_trainer_items_total", {"kind": "optim_step"}) == 1
    assert get("tunemesh_trainer_step_duration_seconds_count") == 1
    assert get("tunemesh_trainer_step_duration_seconds_sum") == seconds


def test_adapters_loaded_and_unloaded_are_counted_and_resident_is_read_live():
    registry = CollectorRegistry()
    metrics = TrainerMetrics(registry)
    core = TrainerCore(_Engine(), 4, metrics)
    metrics.follow(core.adapter_count, core.max_adapters)

    async def main():
        await core.create_adapter("run-a", LoraSpec())
        await core.create_adapter("run-b", LoraSpec())
        await core.import_adapter("run-b", AdapterState(LoraSpec(), {}, None, 3))
        await core.delete_adapter("run-a")

    asyncio.run(main())
    core.close()
    get = registry.get_sample_value
    assert get("tunemesh_trainer_adapters_loaded_total", {"source": "new"}) == 2
    assert get("tunemesh_trainer_adapters_loaded_total", {"source": "checkpoint"}) == 1
    assert get("tunemesh_trainer_adapters_unloaded_total") == 1
    assert get("tunemesh_trainer_adapters_resident") == 1
    assert get("tunemesh_trainer_adapter_slots") == 4


class _ThreadedEngine(_Engine):
    """Allows two adapters' steps at once; a's and b's steps meet at a barrier (so they pass
    only when they run side by side), c's step fails."""

    adapter_threads = 2

    def __init__(self) -> None:
        super().__init__()
        self.meet = threading.Barrier(2, timeout=10)
        self.threads: dict[str, int] = {}

    def optim_step(self, adapter_id: str, adam: AdamSpec) -> dict[str, float]:
        self.threads[adapter_id] = threading.get_ident()
        if adapter_id == "c":
            raise RuntimeError("simulated engine bug")
        if adapter_id in ("a", "b"):
            self.meet.wait()
        return {"adapter": float(ord(adapter_id))}


def test_a_batchs_optimizer_steps_run_side_by_side_in_order_and_fail_alone():
    engine = _ThreadedEngine()
    core = TrainerCore(engine, 4)
    optims = [OptimItem(f"op-{a}", a, AdamSpec()) for a in ("a", "b", "c")]
    outcomes, _ = asyncio.run(core.run_batch([], optims))
    core.close()
    assert [o.item_id for o in outcomes] == ["op-a", "op-b", "op-c"]
    assert outcomes[0].metrics == {"adapter": 97.0} and outcomes[1].metrics == {"adapter": 98.0}
    assert outcomes[0].failure is None and outcomes[1].failure is None
    assert outcomes[2].failure.reason == "ENGINE_ERROR"
    assert engine.threads["a"] != engine.threads["b"]


def test_two_steps_of_one_adapter_in_a_batch_run_one_after_the_other():
    engine = _ThreadedEngine()
    core = TrainerCore(engine, 4)
    optims = [OptimItem("op-1", "d", AdamSpec()), OptimItem("op-2", "d", AdamSpec())]
    seen = []
    engine.optim_step = lambda adapter_id, adam: seen.append(threading.get_ident()) or {}
    outcomes, _ = asyncio.run(core.run_batch([], optims))
    core.close()
    assert [o.failure for o in outcomes] == [None, None] and len(set(seen)) == 1
