"""Checkpoint records <-> protos, and the chunked file streams of uploads."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

from google.protobuf import timestamp_pb2

from tunemesh.v1 import checkpoints_pb2, types_pb2
from tunemesh_checkpoint.catalog import CheckpointRecord
from tunemesh_common.checkpoint_paths import CheckpointKind
from tunemesh_common.errors import InvalidArgument, ResourceExhausted

KINDS = {
    CheckpointKind.STATE: checkpoints_pb2.CHECKPOINT_KIND_STATE,
    CheckpointKind.SAMPLER: checkpoints_pb2.CHECKPOINT_KIND_SAMPLER,
    CheckpointKind.IMPORTED: checkpoints_pb2.CHECKPOINT_KIND_IMPORTED,
}
LORA_FIELDS = ("rank", "alpha", "train_attn", "train_mlp", "train_unembed", "train_experts", "seed")


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    whole = math.floor(seconds)
    nanos = round((seconds - whole) * 1e9)
    return timestamp_pb2.Timestamp(seconds=whole + nanos // 10**9, nanos=nanos % 10**9)


def lora_dict(msg: types_pb2.LoraConfig) -> dict:
    return {name: getattr(msg, name) for name in LORA_FIELDS}


def checkpoint(record: CheckpointRecord) -> checkpoints_pb2.Checkpoint:
    msg = checkpoints_pb2.Checkpoint(
        path=str(record.path),
        kind=KINDS[record.path.kind],
        run=record.path.run,
        name=record.path.name,
        base_model=record.base_model,
        lora_config=types_pb2.LoraConfig(**{k: record.lora[k] for k in LORA_FIELDS if k in record.lora}),
        step=record.step,
        has_optimizer_state=record.has_optimizer_state,
        size_bytes=record.size_bytes,
        create_time=timestamp(record.create_time),
        user_metadata=record.user_metadata,
        files=[checkpoints_pb2.CheckpointFile(name=f.name, size_bytes=f.size, sha256=f.sha256) for f in record.files],
    )
    if record.expire_time is not None:
        msg.expire_time.CopyFrom(timestamp(record.expire_time))
    return msg


async def read_upload(requests: AsyncIterator, max_bytes: int):
    """(header, {file name: bytes}) of a header-then-chunks stream; chunks of a file must
    arrive in order (offset = bytes so far) and the total must stay within `max_bytes`."""
    header, files, total = None, {}, 0
    async for request in requests:
        part = request.WhichOneof("part")
        if header is None:
            if part != "header":
                raise InvalidArgument("BAD_UPLOAD", "the first message must carry the header")
            header = request.header
            continue
        if part != "chunk":
            raise InvalidArgument("BAD_UPLOAD", "only the first message may carry a header")
        chunk = request.chunk
        buffer = files.setdefault(chunk.file_name, bytearray())
        if chunk.offset != len(buffer):
            raise InvalidArgument("BAD_UPLOAD", f"{chunk.file_name[:100]!r}: chunk at offset {chunk.offset}, expected {len(buffer)}")
        total += len(chunk.data)
        if total > max_bytes:
            raise ResourceExhausted("UPLOAD_TOO_LARGE", f"uploads are limited to {max_bytes} bytes")
        buffer += chunk.data
    if header is None:
        raise InvalidArgument("BAD_UPLOAD", "empty upload stream")
    return header, {name: bytes(data) for name, data in files.items()}
