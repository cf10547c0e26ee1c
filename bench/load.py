"""The scheduler under load: many long-lived waits plus many writers, for minutes.

    python bench/load.py --json bench/results/load.json          # 1,000 watchers, 64 writers, 120 s

A mesh on loopback (etcd, two scheduler replicas, checkpoint service, one tiny-dense
trainer). In one client process on asyncio (grpc.aio, a few channels):

- `--watchers` WatchOperations streams stay open the whole time (what waiting SDK clients
  hold), spread over the tenants; each must keep receiving heartbeats;
- `--writers` writers, each with its own run, loop forward_backward (1 x 16 tokens) +
  optim_step through the public RPCs and wait for each operation with WaitOperation.

Reported: errors of any kind (zero is the aim), the submit latency of the writers' calls
(p50 / p99, the time for ForwardBackward / OptimStep to return their Operation),
operations completed, watch messages received (heartbeats and the tenants' completions), and the leading scheduler's peak RSS and CPU
seconds over the run (from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from channels import public_channel  # noqa: E402
from memory_bounds import RssSampler, tiny_model  # noqa: E402
from train_throughput import BenchMesh, log, token_rows, write_json  # noqa: E402

TINY = "tunemesh/tiny-dense"
TENANTS = 8


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Load:
    """The client side: watchers and writers on one event loop."""

    def __init__(self, address: str, keys: list[str], datum, duration_s: float) -> None:
        self.address, self.keys, self.datum, self.duration_s = address, keys, datum, duration_s
        self.errors: list[str] = []
        self.submit_s: list[float] = []
        self.completed = 0
        self.watch_messages = 0

    def _metadata(self, i: int):
        return (("authorization", f"Bearer {self.keys[i % len(self.keys)]}"),)

    async def watcher(self, channel, i: int, stop: asyncio.Event) -> None:
        from google.protobuf import duration_pb2

        from tunemesh.v1 import operations_pb2, operations_pb2_grpc

        stub = operations_pb2_grpc.OperationServiceStub(channel)
        request = operations_pb2.WatchOperationsRequest(heartbeat_interval=duration_pb2.Duration(seconds=5))
        stream = stub.WatchOperations(request, metadata=self._metadata(i))
        try:
            async for _ in stream:
                self.watch_messages += 1
                if stop.is_set():
                    break
        except Exception as err:  # noqa: BLE001 - every failure is counted
            if not stop.is_set():
                self.errors.append(f"watch {i}: {err!r}"[:200])
        finally:
            stream.cancel()

    async def writer(self, channel, i: int, stop: asyncio.Event) -> None:
        from tunemesh.v1 import operations_pb2, operations_pb2_grpc, training_pb2, training_pb2_grpc, types_pb2

        training = training_pb2_grpc.TrainingServiceStub(channel)
        operations = operations_pb2_grpc.OperationServiceStub(channel)
        metadata = self._metadata(i)
        try:
            session = await _session(channel, metadata)
            run = (await training.CreateTrainingRun(training_pb2.CreateTrainingRunRequest(
                session=session, base_model=TINY, lora_config=types_pb2.LoraConfig(rank=4, train_attn=True, train_mlp=True)),
                metadata=metadata)).run.name
            seq = 0
            while not stop.is_set():
                for make in (lambda s: training.ForwardBackward(training_pb2.ForwardBackwardRequest(
                                 run=run, seq_id=s, request_id=f"w{i}-{s}", data=[self.datum],
                                 loss_fn="cross_entropy"), metadata=metadata),
                             lambda s: training.OptimStep(training_pb2.OptimStepRequest(
                                 run=run, seq_id=s, request_id=f"w{i}-{s}",
                                 adam_params=types_pb2.AdamParams(learning_rate=1e-4, beta1=0.9, beta2=0.95,
                                                                  eps=1e-8)), metadata=metadata)):
                    seq += 1
                    began = time.perf_counter()
                    op = (await make(seq)).operation
                    self.submit_s.append(time.perf_counter() - began)
                    while not op.done:
                        op = (await operations.WaitOperation(
                            operations_pb2.WaitOperationRequest(name=op.name), metadata=metadata)).operation
                    if op.HasField("error"):
                        self.errors.append(f"writer {i} seq {seq}: {op.error.reason}")
                    self.completed += 1
        except Exception as err:  # noqa: BLE001 - every failure is counted
            self.errors.append(f"writer {i}: {err!r}"[:200])

    async def run(self, watchers: int, writers: int, channels: int) -> None:
        opened = [public_channel(self.address, aio=True) for _ in range(channels)]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(self.watcher(opened[i % channels], i, stop)) for i in range(watchers)]
        tasks += [asyncio.create_task(self.writer(opened[i % channels], i, stop)) for i in range(writers)]
        await asyncio.sleep(self.duration_s)
        stop.set()
        done, pending = await asyncio.wait(tasks, timeout=30)
        for task in pending:
            task.cancel()
        for channel in opened:
            await channel.close()


async def _session(channel, metadata) -> str:
    from tunemesh.v1 import sessions_pb2, sessions_pb2_grpc

    reply = await sessions_pb2_grpc.SessionServiceStub(channel).CreateSession(
        sessions_pb2.CreateSessionRequest(), metadata=metadata)
    return reply.session.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from tunemesh.v1 import types_pb2

    data_dir, vocab = tiny_model()
    row = token_rows(vocab, 1, 16, 0)[0]
    datum = types_pb2.Datum(
        model_input=types_pb2.ModelInput(chunks=[types_pb2.ModelInputChunk(
            encoded_text=types_pb2.EncodedTextChunk(tokens=row[:-1].tolist()))]),
        loss_fn_inputs={"target_tokens": types_pb2.TensorData(dtype=types_pb2.DTYPE_INT64, shape=[16],
                                                              data=row[1:].astype(np.int64).tobytes()),
                        "weights": types_pb2.TensorData(dtype=types_pb2.DTYPE_FLOAT32, shape=[16],
                                                        data=np.ones(16, np.float32).tobytes())})
    with tempfile.TemporaryDirectory(prefix="tunemesh-load-") as tmp:
        with BenchMesh(TINY, data_dir, Path(tmp) / "state", tenants=TENANTS) as mesh:
            pids = [p.pid for p in mesh.mesh.by_role("scheduler")]
            cpu_before = {pid: cpu_seconds(pid) for pid in pids}
            load = Load(mesh.address, mesh.keys, datum, args.seconds)
            log(f"{args.watchers} watchers, {args.writers} writers, {args.seconds:.0f} s")
            began = time.perf_counter()
            with RssSampler(pids) as rss:
                asyncio.run(load.run(args.watchers, args.writers, args.channels))
            wall = time.perf_counter() - began
            cpu = max(cpu_seconds(pid) - cpu_before[pid] for pid in pids)
    submit_ms = np.asarray(load.submit_s) * 1e3
    results = {
        "model": TINY, "load_average": os.getloadavg(), "watchers": args.watchers, "writers": args.writers,
        "seconds": wall, "errors": len(load.errors), "first_errors": load.errors[:5],
        "operations_completed": load.completed, "watch_messages": load.watch_messages,
        "submit_ms": {"p50": float(np.percentile(submit_ms, 50)), "p99": float(np.percentile(submit_ms, 99))}
        if len(submit_ms) else {},
        "scheduler_peak_rss_mib": rss.peak_kib / 1024, "scheduler_cpu_s": cpu,
        "scheduler_cpu_share_of_one_core": cpu / wall,
    }
    log(str(results))
    write_json(args.json, results)
    return 0 if not load.errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
