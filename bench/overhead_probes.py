"""Control-plane overhead probes: one 1 x 8-token forward_backward measured at each layer.

Each probe is a zero-argument call returning seconds per stage name; `run_probes`
interleaves them in blocks so load drift on a shared machine hits every probe alike.
Used by bench/train_throughput.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from channels import public_channel, trainer_channel

Probe = Callable[[], dict[str, float]]  # one call; returns seconds per stage name


def sdk_probe(client, datums: list) -> Probe:
    """The SDK: forward_backward(...).result(), lanes, waiter threads and all."""
    def call() -> dict[str, float]:
        began = time.perf_counter()
        client.forward_backward(datums, "cross_entropy").result()
        return {"sdk": time.perf_counter() - began}
    return call


def public_rpc_probe(address: str, api_key: str, run: str, datums: list) -> Probe:
    """Bare public RPCs on one thread: ForwardBackward, then WaitOperation until done."""
    from tunemesh.v1 import operations_pb2, operations_pb2_grpc, training_pb2, training_pb2_grpc

    channel = public_channel(address)  # the scheduler replicas' addresses
    training = training_pb2_grpc.TrainingServiceStub(channel)
    operations = operations_pb2_grpc.OperationServiceStub(channel)
    metadata, seq = (("authorization", f"Bearer {api_key}"),), iter(range(1, 1 << 30))

    def call() -> dict[str, float]:
        seq_id = next(seq)
        request = training_pb2.ForwardBackwardRequest(run=run, seq_id=seq_id, request_id=f"bench-{seq_id}",
                                                      data=datums, loss_fn="cross_entropy")
        began = time.perf_counter()
        op = training.ForwardBackward(request, metadata=metadata).operation
        submitted = time.perf_counter()
        while not op.done:
            wait = operations_pb2.WaitOperationRequest(name=op.name)
            op = operations.WaitOperation(wait, metadata=metadata).operation
        done = time.perf_counter()
        return {"public_rpc": done - began, "public_submit": submitted - began, "public_wait": done - submitted}
    return call


def trainer_rpc_probe(mesh, address: str, adapter_id: str, datums: list) -> Probe:
    """The trainer's internal RunBatch called directly (no scheduler), and its engine seconds."""
    from tunemesh_internal.v1 import trainer_pb2, trainer_pb2_grpc

    trainer = trainer_pb2_grpc.TrainerServiceStub(trainer_channel(mesh, "trainer-0", address))
    item = trainer_pb2.BatchItem(item_id="direct", adapter_id=adapter_id, data=datums, loss_fn="cross_entropy",
                                 kind=trainer_pb2.ITEM_KIND_FORWARD_BACKWARD)

    def call() -> dict[str, float]:
        began = time.perf_counter()
        response = trainer.RunBatch(trainer_pb2.RunBatchRequest(items=[item]))
        return {"trainer_rpc": time.perf_counter() - began, "trainer_engine": response.engine_seconds}
    return call


def engine_probe(model_dir: Path, entry, row: np.ndarray) -> Probe:
    """The same item on an in-process TorchTrainingEngine (run_batch with one EngineItem)."""
    from tunemesh_trainer.domain import DatumArrays, EngineItem, ItemKind, LoraSpec
    from tunemesh_trainer.engine import build_torch_engine

    engine = build_torch_engine(model_dir, name=entry.name, family=entry.family,
                                max_lora_rank=entry.max_lora_rank, max_seq_len=entry.max_seq_len)
    engine.create_adapter("bench", LoraSpec(rank=8, alpha=8.0))
    weights = np.ones(len(row) - 1, np.float32)
    datum = DatumArrays(tokens=row[:-1], loss_inputs={"target_tokens": row[1:], "weights": weights})

    def call() -> dict[str, float]:
        began = time.perf_counter()
        outcome = engine.run_batch([EngineItem("item", "bench", ItemKind.FORWARD_BACKWARD, [datum])])[0]
        if outcome.failure is not None:
            raise RuntimeError(f"engine item failed: {outcome.failure}")
        return {"engine": time.perf_counter() - began}
    return call


def run_probes(probes: list[Probe], calls: int, warmup: int, block: int = 10) -> dict[str, list[float]]:
    """Call every probe `warmup` times, then `calls` times in interleaved blocks (so load
    drift on a shared machine hits every probe alike); seconds per stage."""
    for probe in probes:
        for _ in range(warmup):
            probe()
    stages: dict[str, list[float]] = {}
    for start in range(0, calls, block):
        for probe in probes:
            for _ in range(min(block, calls - start)):
                for name, seconds in probe().items():
                    stages.setdefault(name, []).append(seconds)
    return stages
