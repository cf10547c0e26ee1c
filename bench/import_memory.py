"""The memory of a large checkpoint import: the scheduler and the checkpoint service while
a multi-GiB PEFT adapter streams through them.

    python bench/import_memory.py --gib 2 --json bench/results/import_memory.json

A mesh on loopback (etcd, scheduler, checkpoint service, one tiny-dense trainer). A raw
gRPC client sends ImportCheckpoint to the scheduler: the header, a small
`adapter_config.json`, then an `adapter_model.safetensors` of `--gib` GiB (one q_proj
LoRA pair at r=8, F32; structurally valid, which is all an import checks) generated as
1 MiB chunks, never held whole by the client. Reported for both services: VmRSS before
and the peak while the import runs (sampled every 20 ms, and VmHWM: `RssSampler` of
memory_bounds.py), the seconds and the answer. A second case sends `--refused-gib` GiB
whose safetensors header is malformed: refused as soon as the header is whole
(INVALID_ARGUMENT BAD_SAFETENSORS), with nothing left in the store's staging area.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from channels import public_channel  # noqa: E402
from memory_bounds import RssSampler, tree_rss_kib  # noqa: E402
from train_throughput import BenchMesh, log, write_json  # noqa: E402

TINY = "tunemesh/tiny-dense"
CHUNK = 1 << 20
RANK = 8


def adapter_config() -> bytes:
    return json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 16, "target_modules": ["q_proj"]}).encode()


def weights_stream(total_bytes: int, valid: bool = True):
    """An `adapter_model.safetensors` of about `total_bytes`, as chunks of zeros after its header."""
    width = total_bytes // (2 * RANK * 4)  # lora_A [r, width], lora_B [width, r], F32
    size = RANK * width * 4
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    header = {f"{key}.lora_A.weight": {"dtype": "F32", "shape": [RANK, width], "data_offsets": [0, size]},
              f"{key}.lora_B.weight": {"dtype": "F32", "shape": [width, RANK], "data_offsets": [size, 2 * size]}}
    raw = json.dumps(header).encode() if valid else b"{not json" + b" " * 64
    raw += b" " * (-len(raw) % 8)
    yield struct.pack("<Q", len(raw)) + raw
    zeros, left = bytes(CHUNK), 2 * size
    while left:
        yield zeros[: min(CHUNK, left)]
        left -= min(CHUNK, left)


def requests(name: str, weights):
    from tunemesh.v1 import checkpoints_pb2 as pb

    yield pb.ImportCheckpointRequest(header=pb.ImportCheckpointHeader(name=name, base_model=TINY))
    yield pb.ImportCheckpointRequest(chunk=pb.FileChunk(file_name="adapter_config.json", offset=0, data=adapter_config()))
    offset = 0
    for data in weights:
        yield pb.ImportCheckpointRequest(chunk=pb.FileChunk(file_name="adapter_model.safetensors", offset=offset, data=data))
        offset += len(data)


def run_import(mesh, name: str, weights) -> dict:
    import grpc

    from tunemesh.errors import error_from_rpc
    from tunemesh.v1 import checkpoints_pb2

    pids = {role: mesh.mesh.by_role(role)[0].pid for role in ("scheduler", "checkpoint")}
    before = {role: tree_rss_kib(pid) / 1024 for role, pid in pids.items()}
    channel = public_channel(mesh.address)
    call = channel.stream_unary("/tunemesh.v1.CheckpointService/ImportCheckpoint",
                                request_serializer=checkpoints_pb2.ImportCheckpointRequest.SerializeToString,
                                response_deserializer=checkpoints_pb2.ImportCheckpointResponse.FromString)
    samplers = {role: RssSampler([pid]) for role, pid in pids.items()}
    for sampler in samplers.values():
        sampler.__enter__()
    start = time.perf_counter()
    try:
        response = call(requests(name, weights), metadata=(("authorization", f"Bearer {mesh.keys[0]}"),), timeout=3600)
        answer, size = "OK", response.checkpoint.size_bytes
    except grpc.RpcError as err:
        answer, size = f"{err.code().name} {error_from_rpc(err).reason}", 0
    seconds = time.perf_counter() - start
    for sampler in samplers.values():
        sampler.__exit__(None, None, None)
    channel.close()
    staging = list((mesh.state_dir / "checkpoints" / "staging").glob("*")) if (mesh.state_dir / "checkpoints").exists() else []
    return {"answer": answer, "stored_bytes": size, "seconds": round(seconds, 2),
            "mib_per_s": round(size / (1 << 20) / seconds, 1) if size else None,
            "rss_before_mib": {r: round(v, 1) for r, v in before.items()},
            "rss_peak_mib": {r: round(s.peak_kib / 1024, 1) for r, s in samplers.items()},
            "staging_leftovers": len(staging)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--refused-gib", type=float, default=0.5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from tunemesh_common.models import ModelRegistry

    data_dir = Path(os.environ.get("TUNEMESH_DATA_DIR", Path.home() / ".cache" / "tunemesh"))
    ModelRegistry.default(data_dir).materialize(TINY)
    with tempfile.TemporaryDirectory(prefix="tunemesh-import-") as tmp, \
            BenchMesh(TINY, data_dir, Path(tmp) / "mesh", tenants=1) as mesh:
        upload = int(args.gib * (1 << 30))
        log(f"importing a {upload / (1 << 30):.2f} GiB adapter through the scheduler")
        accepted = run_import(mesh, f"big-{uuid.uuid4().hex[:8]}", weights_stream(upload))
        log(str(accepted))
        refused_bytes = int(args.refused_gib * (1 << 30))
        refused = run_import(mesh, f"bad-{uuid.uuid4().hex[:8]}", weights_stream(refused_bytes, valid=False))
        log(str(refused))
    results = {"model": TINY, "load_average": os.getloadavg(), "chunk_bytes": CHUNK, "upload_bytes": upload,
               "accepted": accepted, "refused_upload_bytes": refused_bytes, "refused": refused}
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
