"""The scheduler's memory under oversized requests: many concurrent requests over its limit.

    python bench/memory_bounds.py --json bench/results/memory_bounds.json

A mesh on loopback (etcd, scheduler, checkpoint service, one tiny-dense trainer). A raw
gRPC client sends `--concurrent` ForwardBackward requests of `--request-mib` MiB each at
once (one serialized message sent by every call) and then one ordinary call through the
SDK. Reported: the resident memory of the largest scheduler replica before, and its peak
while the requests are answered (sampled every 20 ms, and VmHWM), each call's status, and whether the ordinary call succeeded. Run
once with the scheduler's default limit (`--max-request-bytes`, 64 MiB) and once with the
old 256 MiB limit, fewer requests (`--baseline-concurrent`: each is decoded whole there).
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from channels import public_channel  # noqa: E402
from train_throughput import BenchMesh, log, sdk_datums, token_rows, write_json  # noqa: E402

TINY = "tunemesh/tiny-dense"


class RssSampler:
    """Samples the resident memory of processes every 20 ms, in a thread: the peak of the
    largest one (the scheduler replicas: the leader serves, the standby waits)."""

    def __init__(self, pids: list[int]) -> None:
        import threading

        self.pids, self.peak_kib, self._stop = pids, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _largest(self) -> int:
        return max(max(tree_rss_kib(pid), _hwm(pid)) for pid in self.pids)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_kib = max(self.peak_kib, self._largest())

    def __enter__(self) -> RssSampler:
        self.peak_kib = self._largest()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def tree_rss_kib(pid: int) -> int:
    """VmRSS of `pid` and its descendants."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += proc_kib(current, "VmRSS")
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (OSError, KeyError):
            continue
        todo += [int(c) for c in children]
    return total


def tiny_model() -> tuple[Path, int]:
    """The model cache (`$TUNEMESH_DATA_DIR`) with tiny-dense materialized, and its vocabulary size."""
    from tunemesh_common.models import ModelRegistry

    data_dir = Path(os.environ.get("TUNEMESH_DATA_DIR", Path.home() / ".cache" / "tunemesh"))
    registry = ModelRegistry.default(data_dir)
    registry.materialize(TINY)
    return data_dir, registry.entry(TINY).vocab_size


def _hwm(pid: int) -> int:
    try:
        return proc_kib(pid, "VmHWM")
    except (OSError, KeyError):
        return 0


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class SchedulerFlagsMesh(BenchMesh):
    """A bench mesh whose schedulers get more flags (e.g. `--max-request-bytes N`)."""

    def __init__(self, *args, scheduler_flags: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scheduler_flags = scheduler_flags

    def _services(self, config, etcd_endpoint: str, api_keys_file: Path) -> list:
        specs = super()._services(config, etcd_endpoint, api_keys_file)
        return [dataclasses.replace(s, argv=(*s.argv, *self.scheduler_flags))
                if s.role == "scheduler" else s for s in specs]


def oversized_request(run: str, mib: int) -> bytes:
    from tunemesh.v1 import training_pb2, types_pb2

    weights = types_pb2.TensorData(dtype=types_pb2.DTYPE_FLOAT32, shape=[mib << 18], data=bytes(mib << 20))
    datum = types_pb2.Datum(model_input=types_pb2.ModelInput(chunks=[types_pb2.ModelInputChunk(
        encoded_text=types_pb2.EncodedTextChunk(tokens=[1, 2]))]), loss_fn_inputs={"weights": weights})
    return training_pb2.ForwardBackwardRequest(run=run, seq_id=1, request_id="oversized", data=[datum],
                                               loss_fn="cross_entropy").SerializeToString()


def case(state: Path, data_dir: Path, max_request_bytes: int, concurrent: int, mib: int, vocab: int) -> dict:
    import tunemesh
    from tunemesh.v1 import training_pb2

    flags = ("--max-request-bytes", str(max_request_bytes))
    with SchedulerFlagsMesh(TINY, data_dir, state, tenants=1, scheduler_flags=flags) as mesh:
        pids = [p.pid for p in mesh.mesh.by_role("scheduler")]
        client = tunemesh.ServiceClient(mesh.address, api_key=mesh.keys[0])
        try:
            trainer = client.create_lora_training_client(TINY, rank=8)
            before_kib = max(tree_rss_kib(pid) for pid in pids)
            payload = oversized_request(trainer.run, mib)
            channel = public_channel(mesh.address, options=[
                ("grpc.max_send_message_length", len(payload) + (1 << 20))])
            call = channel.unary_unary("/tunemesh.v1.TrainingService/ForwardBackward",
                                       request_serializer=None,
                                       response_deserializer=training_pb2.ForwardBackwardResponse.FromString)
            metadata = (("authorization", f"Bearer {mesh.keys[0]}"),)
            log(f"limit {max_request_bytes >> 20} MiB: {concurrent} x {len(payload) >> 20} MiB requests")
            with RssSampler(pids) as sampler, ThreadPoolExecutor(concurrent) as pool:
                futures = [pool.submit(_code_of, call, payload, metadata) for _ in range(concurrent)]
                codes = [f.result() for f in futures]
            channel.close()
            peak_kib = sampler.peak_kib
            after = trainer.forward_backward(sdk_datums(token_rows(vocab, 1, 16, 0)), "cross_entropy")
            next_call_ok = after.result(timeout=120).metrics["loss:sum"] > 0
            alive = all(Path(f"/proc/{pid}").exists() for pid in pids)
        finally:
            client.close()
    return {"scheduler_replicas": len(pids), "max_request_bytes": max_request_bytes, "concurrent": concurrent, "request_bytes": len(payload),
            "rss_before_mib": before_kib / 1024, "rss_peak_mib": peak_kib / 1024,
            "codes": {c: codes.count(c) for c in set(codes)}, "next_call_ok": next_call_ok,
            "scheduler_alive": alive}


def _code_of(call, payload: bytes, metadata) -> str:
    import grpc

    try:
        call(payload, metadata=metadata, timeout=300)
        return "OK"
    except grpc.RpcError as err:
        return f"{err.code().name}: {(err.details() or '')[:90]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, default=20)
    parser.add_argument("--baseline-concurrent", type=int, default=2)
    parser.add_argument("--request-mib", type=int, default=250)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    data_dir, vocab = tiny_model()
    with tempfile.TemporaryDirectory(prefix="tunemesh-memory-") as tmp:
        limited = case(Path(tmp) / "limited", data_dir, 64 << 20, args.concurrent, args.request_mib, vocab)
        old = case(Path(tmp) / "old", data_dir, 256 << 20, args.baseline_concurrent, args.request_mib, vocab)
    results = {"model": TINY, "load_average": os.getloadavg(), "default_limit": limited, "old_limit": old}
    log(str(results))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
