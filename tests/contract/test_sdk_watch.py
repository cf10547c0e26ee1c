"""The SDK's one watcher against the in-process scheduler: a thousand pending operations
take no thread each, and they all resolve through one WatchOperations stream, also when
the scheduler's completion log starts over (a new epoch) while they wait."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import tunemesh
from mesh_harness import FAST_RETRY
from tunemesh_common.models import TINY_DENSE
from tunemesh_scheduler.core.completions import CompletionLog

RUNS, OPS_PER_RUN = 16, 63  # 1,008 operations; 16 runs fit the trainer's 64 adapter slots
THREAD_SLACK = 4


class HeldTrainer:
    """Holds every RunBatch the scheduler sends until `release()`."""

    def __init__(self, mesh) -> None:
        self.mesh, self.port = mesh, mesh.port
        self.real = mesh.port.run_batch
        self.gate = mesh.loop.run(self._event())
        self.held = 0

    @staticmethod
    async def _event() -> asyncio.Event:
        return asyncio.Event()

    async def run_batch(self, node_id, items):
        self.held += 1
        await self.gate.wait()
        return await self.real(node_id, items)

    def __enter__(self) -> HeldTrainer:
        self.port.run_batch = self.run_batch
        return self

    def release(self) -> None:
        self.mesh.loop.loop.call_soon_threadsafe(self.gate.set)

    def __exit__(self, *exc) -> None:
        self.release()
        del self.port.run_batch


def datum(i: int) -> tunemesh.Datum:
    return tunemesh.Datum(tunemesh.ModelInput.from_ints([1 + i % 500, 2]), {"target_tokens": [2, 3]})


def queued(mesh) -> int:
    return mesh.core.operations.by_state["QUEUED"] + mesh.core.operations.by_state["RUNNING"]


def until(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def service(mesh, tmp_path):
    with tunemesh.ServiceClient(mesh.address, "key-a", retry_policy=FAST_RETRY, tokenizer_cache_dir=tmp_path) as s:
        yield s


def start_many(service) -> list:
    trainers = [service.create_lora_training_client(TINY_DENSE, rank=4, seed=1) for _ in range(RUNS)]
    trainers[0].forward([datum(0)]).result(timeout=60)  # the loop, channel and stream are up
    return trainers


@pytest.mark.parametrize("new_epoch", [False, True])
def test_a_thousand_pending_operations_use_a_fixed_few_threads_and_all_resolve(mesh, service, new_epoch):
    trainers = start_many(service)
    baseline = threading.active_count()
    before = queued(mesh)
    with HeldTrainer(mesh) as trainer:
        futures = [t.forward([datum(i)]) for i in range(OPS_PER_RUN) for t in trainers]
        peak = threading.active_count()
        until(lambda: queued(mesh) - before >= len(futures))  # every submit reached the scheduler
        peak = max(peak, threading.active_count())
        time.sleep(0.5)  # the operations wait: the watcher streams, nothing polls
        peak = max(peak, threading.active_count())
        assert not any(f.done() for f in futures) and trainer.held >= 1
        if new_epoch:  # as after a restart: cursors of the old epoch cannot be served
            mesh.loop.run(_swap_log(mesh))
        trainer.release()
        outputs = [f.result(timeout=120) for f in futures]
        peak = max(peak, threading.active_count())
    assert peak <= baseline + THREAD_SLACK, (baseline, peak)
    assert len(outputs) == RUNS * OPS_PER_RUN == 1008
    assert all(len(out.loss_fn_outputs) == 1 for out in outputs)
    watcher = service._tracker._watcher
    assert watcher._streaming and watcher._epoch == mesh.core.completions.log.epoch


async def _swap_log(mesh) -> None:
    mesh.core.completions.log = CompletionLog("epoch-after-restart")
