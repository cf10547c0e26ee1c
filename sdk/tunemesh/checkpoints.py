"""CheckpointClient: list, inspect, expire, delete, download and import checkpoints.

Unary calls are retried like every other SDK call. Transfers are not:

- A download is not retried mid-stream. A failed download (gRPC error, checksum
  mismatch, a malformed stream) removes its `.part` files and leaves no final file:
  files are renamed into place only once every file of the checkpoint has arrived and
  matched its announced size and sha256.
- An import is not retried: it carries no request id, so a retry after a lost response
  could not tell "already imported" from "name taken". Re-run it on UNAVAILABLE.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import pathlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO

import grpc

from tunemesh import _wire
from tunemesh.errors import TunemeshError, error_for, error_from_rpc
from tunemesh.transport import Transport
from tunemesh.types import LoraConfig, ParsedCheckpointTinkerPath
from tunemesh.v1 import checkpoints_pb2

CHUNK_BYTES = 1024 * 1024
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""The files of a PEFT adapter directory that an import uploads, in this order."""

PART_SUFFIX = ".part"

Progress = Callable[[int, int], None]
"""Called as `progress(bytes_done, bytes_total)` while a transfer moves bytes."""

_KIND_NAMES = {
    checkpoints_pb2.CHECKPOINT_KIND_STATE: "state",
    checkpoints_pb2.CHECKPOINT_KIND_SAMPLER: "sampler",
    checkpoints_pb2.CHECKPOINT_KIND_IMPORTED: "imported",
}


@dataclasses.dataclass(frozen=True)
class CheckpointFile:
    """One file of a checkpoint: name, size and hex sha256 of its content."""

    name: str
    size_bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A persisted adapter owned by the caller's tenant.

    `kind` is "state", "sampler" or "imported"; `run` is "" for imports; times are UTC
    and `expire_time` None means it never expires.
    """

    path: str
    kind: str
    run: str
    name: str
    base_model: str
    lora_config: LoraConfig
    step: int
    has_optimizer_state: bool
    size_bytes: int
    create_time: datetime.datetime
    expire_time: datetime.datetime | None
    user_metadata: dict[str, str]
    files: tuple[CheckpointFile, ...]

    # Tinker's names for the same facts, for code written against tinker.Checkpoint.

    @property
    def tinker_path(self) -> str:
        """The path to pass back to tunemesh: `path`."""
        return self.path

    @property
    def checkpoint_type(self) -> str:
        """Tinker's kind: "training" (a state checkpoint) or "sampler" (sampler weights, an import)."""
        return ParsedCheckpointTinkerPath.from_tinker_path(self.path).checkpoint_type

    @property
    def checkpoint_id(self) -> str:
        """Tinker's `{weights|sampler_weights}/{name}`."""
        return ParsedCheckpointTinkerPath.from_tinker_path(self.path).checkpoint_id

    @property
    def time(self) -> datetime.datetime:
        return self.create_time

    @property
    def expires_at(self) -> datetime.datetime | None:
        return self.expire_time


def checkpoint_from_proto(msg: checkpoints_pb2.Checkpoint) -> Checkpoint:
    """Decode a wire Checkpoint."""
    expire_time = None
    if msg.HasField("expire_time"):
        expire_time = msg.expire_time.ToDatetime(tzinfo=datetime.timezone.utc)
    return Checkpoint(
        path=msg.path,
        kind=_KIND_NAMES.get(msg.kind, "unspecified"),
        run=msg.run,
        name=msg.name,
        base_model=msg.base_model,
        lora_config=_wire.lora_from_proto(msg.lora_config),
        step=msg.step,
        has_optimizer_state=msg.has_optimizer_state,
        size_bytes=msg.size_bytes,
        create_time=msg.create_time.ToDatetime(tzinfo=datetime.timezone.utc),
        expire_time=expire_time,
        user_metadata=dict(msg.user_metadata),
        files=tuple(CheckpointFile(f.name, f.size_bytes, f.sha256) for f in msg.files),
    )


class CheckpointClient:
    """The caller's checkpoints; get one from `ServiceClient.create_checkpoint_client()`."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def list(self, run: str | None = None, page_size: int = 100) -> Iterator[Checkpoint]:
        """Every checkpoint of `run` (`runs/{id}`), or all of the caller's, by path."""
        token = ""
        while True:
            page, token = self.list_page(run, page_size, token)
            yield from page
            if not token:
                return

    def list_page(
        self, run: str | None = None, page_size: int = 100, page_token: str = ""
    ) -> tuple[list[Checkpoint], str]:
        """One page of checkpoints and the token of the next ("" after the last)."""
        request = checkpoints_pb2.ListCheckpointsRequest(
            run=run or "", page_size=page_size, page_token=page_token
        )
        response = self._call("ListCheckpoints", request)
        return [checkpoint_from_proto(c) for c in response.checkpoints], response.next_page_token

    def get(self, path: str) -> Checkpoint:
        """The checkpoint at `path`, e.g. `tunemesh://runs/{run}/state/{name}`."""
        response = self._call("GetCheckpoint", checkpoints_pb2.GetCheckpointRequest(path=path))
        return checkpoint_from_proto(response.checkpoint)

    def delete(self, path: str) -> None:
        """Delete the checkpoint at `path`."""
        self._call("DeleteCheckpoint", checkpoints_pb2.DeleteCheckpointRequest(path=path))

    def set_ttl(self, path: str, ttl_seconds: int | None) -> Checkpoint:
        """Expire the checkpoint `ttl_seconds` from now; None removes its expiry."""
        if ttl_seconds is not None and ttl_seconds < 1:
            raise ValueError(f"ttl_seconds must be at least 1 (or None), got {ttl_seconds}")
        request = checkpoints_pb2.UpdateCheckpointTtlRequest(
            path=path, ttl_seconds=ttl_seconds or 0
        )
        return checkpoint_from_proto(self._call("UpdateCheckpointTtl", request).checkpoint)

    def download(
        self,
        path: str,
        dest_dir: str | os.PathLike[str],
        *,
        progress: Progress | None = None,
        overwrite: bool = False,
    ) -> pathlib.Path:
        """Write the checkpoint's files into `dest_dir` (created if needed); return it.

        Raises FileExistsError if a file is already there and not `overwrite`, and a
        DATA_LOSS TunemeshError if a file's size or sha256 differs from what the server
        announced. Not retried; a failed download leaves no file behind.
        """
        dest = pathlib.Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        request = checkpoints_pb2.DownloadCheckpointRequest(path=path)
        stream = self._transport.stream(self._transport.checkpoints.DownloadCheckpoint, request)
        writer = _DownloadWriter(dest, overwrite, progress)
        try:
            for response in stream:
                writer.accept(response)
            writer.commit()
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            stream.close()
            writer.discard()
        return dest

    def import_peft(
        self,
        directory: str | os.PathLike[str],
        *,
        base_model: str,
        name: str,
        ttl_seconds: int | None = None,
        user_metadata: Mapping[str, str] | None = None,
        progress: Progress | None = None,
    ) -> Checkpoint:
        """Upload a PEFT adapter directory as `tunemesh://imports/{name}`. Not retried."""
        if ttl_seconds is not None and ttl_seconds < 1:
            raise ValueError(f"ttl_seconds must be at least 1 (or None), got {ttl_seconds}")
        paths = [_peft_file(pathlib.Path(directory), file_name) for file_name in PEFT_FILES]
        header = checkpoints_pb2.ImportCheckpointHeader(
            name=name, base_model=base_model, ttl_seconds=ttl_seconds or 0,
            user_metadata=dict(user_metadata or {}),
        )
        requests = _import_requests(header, paths, progress)
        try:
            response = self._transport.upload(self._transport.checkpoints.ImportCheckpoint, requests)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return checkpoint_from_proto(response.checkpoint)

    def _call(self, method: str, request):
        return self._transport.call(
            getattr(self._transport.checkpoints, method), request, what=method
        )


def _peft_file(directory: pathlib.Path, file_name: str) -> pathlib.Path:
    path = directory / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: a PEFT adapter directory needs {file_name}")
    return path


def _import_requests(
    header: checkpoints_pb2.ImportCheckpointHeader,
    paths: list[pathlib.Path],
    progress: Progress | None,
) -> Iterator[checkpoints_pb2.ImportCheckpointRequest]:
    """The header, then each file's chunks, file after file."""
    yield checkpoints_pb2.ImportCheckpointRequest(header=header)
    total = sum(path.stat().st_size for path in paths)
    done = 0
    for path in paths:
        for chunk in _file_chunks(path):
            yield checkpoints_pb2.ImportCheckpointRequest(chunk=chunk)
            done += len(chunk.data)
            if progress is not None:
                progress(done, total)


def _file_chunks(path: pathlib.Path) -> Iterator[checkpoints_pb2.FileChunk]:
    """1 MiB chunks of a file; one empty chunk for an empty file, so it is still sent."""
    with open(path, "rb") as f:
        offset = 0
        while data := f.read(CHUNK_BYTES):
            yield checkpoints_pb2.FileChunk(file_name=path.name, offset=offset, data=data)
            offset += len(data)
    if offset == 0:
        yield checkpoints_pb2.FileChunk(file_name=path.name, offset=0, data=b"")


def is_safe_file_name(name: str) -> bool:
    """Whether `name` is one plain path segment (no separators, not `.`/`..`, no NUL)."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _stream_error(reason: str, message: str) -> TunemeshError:
    return error_for(grpc.StatusCode.DATA_LOSS, reason, message)


@dataclasses.dataclass
class _PartFile:
    """A file being received: its `.part` handle, running hash and byte count."""

    expected: CheckpointFile
    part: pathlib.Path
    handle: BinaryIO | None = None
    digest: Any = dataclasses.field(default_factory=hashlib.sha256)
    received: int = 0


class _DownloadWriter:
    """Turns a DownloadCheckpoint stream into verified files, all or nothing."""

    def __init__(self, dest: pathlib.Path, overwrite: bool, progress: Progress | None) -> None:
        self._dest, self._overwrite, self._progress = dest, overwrite, progress
        self._files: dict[str, _PartFile] | None = None
        self._total = 0
        self._done = 0

    def accept(self, response: checkpoints_pb2.DownloadCheckpointResponse) -> None:
        part = response.WhichOneof("part")
        if part == "checkpoint" and self._files is None:
            self._start(response.checkpoint)
        elif part == "chunk" and self._files is not None:
            self._write(response.chunk)
        else:
            raise _stream_error("MALFORMED_STREAM", f"unexpected {part or 'empty'} message")

    def commit(self) -> None:
        """Verify every file and move it into place."""
        if self._files is None:
            raise _stream_error("MALFORMED_STREAM", "the download stream was empty")
        for file in self._files.values():
            if file.handle is None:
                file.handle = open(file.part, "wb")
            file.handle.close()
            _verify(file)
        for name, file in self._files.items():
            os.replace(file.part, self._dest / name)
        self._files = {}

    def discard(self) -> None:
        """Close and remove whatever `.part` files are left (after a failure)."""
        for file in (self._files or {}).values():
            if file.handle is not None:
                file.handle.close()
            file.part.unlink(missing_ok=True)

    def _start(self, checkpoint: checkpoints_pb2.Checkpoint) -> None:
        files: dict[str, _PartFile] = {}
        for entry in checkpoint.files:
            if not is_safe_file_name(entry.name):
                raise _stream_error("UNSAFE_FILE_NAME", f"refusing file name {entry.name!r}")
            final = self._dest / entry.name
            if final.exists() and not self._overwrite:
                raise FileExistsError(
                    f"{final} already exists; pass overwrite=True to replace it"
                )
            expected = CheckpointFile(entry.name, entry.size_bytes, entry.sha256)
            files[entry.name] = _PartFile(expected, self._dest / (entry.name + PART_SUFFIX))
        self._files = files
        self._total = sum(f.expected.size_bytes for f in files.values())
        if self._progress is not None:
            self._progress(0, self._total)

    def _write(self, chunk: checkpoints_pb2.FileChunk) -> None:
        file = self._files.get(chunk.file_name)
        if file is None:
            raise _stream_error(
                "MALFORMED_STREAM", f"chunk of unannounced file {chunk.file_name!r}"
            )
        if chunk.offset != file.received:
            raise _stream_error(
                "MALFORMED_STREAM",
                f"{chunk.file_name}: chunk at offset {chunk.offset}, expected {file.received}",
            )
        if file.received + len(chunk.data) > file.expected.size_bytes:
            raise _stream_error(
                "CHECKSUM_MISMATCH", f"{chunk.file_name} is longer than announced"
            )
        if file.handle is None:
            file.handle = open(file.part, "wb")
        file.handle.write(chunk.data)
        file.digest.update(chunk.data)
        file.received += len(chunk.data)
        self._done += len(chunk.data)
        if self._progress is not None:
            self._progress(self._done, self._total)


def _verify(file: _PartFile) -> None:
    name, expected = file.expected.name, file.expected
    if file.received != expected.size_bytes:
        raise _stream_error(
            "CHECKSUM_MISMATCH",
            f"{name}: received {file.received} bytes, expected {expected.size_bytes}",
        )
    if file.digest.hexdigest() != expected.sha256.lower():
        raise _stream_error(
            "CHECKSUM_MISMATCH", f"{name}: sha256 {file.digest.hexdigest()} != {expected.sha256}"
        )
