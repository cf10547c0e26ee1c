"""EtcdPlacement: least-loaded trainer, capacity counted before the etcd write."""

from __future__ import annotations

import asyncio

import pytest

from tunemesh_internal.v1 import trainer_pb2
from tunemesh.v1 import sessions_pb2
from tunemesh.errors import NotFoundError, ResourceExhaustedError
from tunemesh_scheduler.nodes import EtcdPlacement, TrainerDirectory


class SlowTable:
    """A placement table whose writes yield to the loop, like a real etcd round trip."""

    def __init__(self) -> None:
        self.placed: dict[str, str] = {}

    async def place_run(self, run_id: str, node_id: str) -> bool:
        await asyncio.sleep(0.01)
        return self.placed.setdefault(run_id, node_id) == node_id

    async def release_run(self, run_id: str, node_id: str) -> bool:
        return self.placed.pop(run_id, None) == node_id


def directory(*nodes: tuple[str, int, int]) -> TrainerDirectory:
    d = TrainerDirectory()
    model = sessions_pb2.SupportedModel(name="m", family="dense", vocab_size=10, max_seq_len=8, max_lora_rank=8)
    for node_id, max_adapters, adapters in nodes:
        record = trainer_pb2.TrainerNode(node_id=node_id, address=f"{node_id}:1", models=[model],
                                         max_adapters=max_adapters, adapters=adapters)
        d.on_change(node_id, record.SerializeToString())
    return d


def test_concurrent_creates_spread_over_trainers_and_never_overfill():
    async def main():
        table = SlowTable()
        placement = EtcdPlacement(directory(("t0", 1, 0), ("t1", 1, 0)), table)
        results = await asyncio.gather(*(placement.place(f"runs/r{i}", "m") for i in range(3)),
                                       return_exceptions=True)
        nodes = sorted(r for r in results if isinstance(r, str))
        assert nodes == ["t0", "t1"]
        assert sum(isinstance(r, ResourceExhaustedError) for r in results) == 1
    asyncio.run(main())


def test_adapters_a_trainer_reports_count_as_used():
    async def main():
        placement = EtcdPlacement(directory(("t0", 2, 2), ("t1", 2, 1)), SlowTable())
        assert await placement.place("runs/a", "m") == "t1"  # t0 reports itself full
        assert await placement.place("runs/b", "m") == "t1"
        with pytest.raises(ResourceExhaustedError):
            await placement.place("runs/c", "m")
        await placement.release("runs/b", "t1")
        assert await placement.place("runs/d", "m") == "t1"
        with pytest.raises(NotFoundError):
            await placement.place("runs/e", "unknown-model")
    asyncio.run(main())


def test_an_undecodable_node_record_is_ignored():
    d = directory(("t0", 1, 0))
    d.on_change("bad", b"\xff\xff not a proto")
    assert sorted(d.nodes()) == ["t0"]
