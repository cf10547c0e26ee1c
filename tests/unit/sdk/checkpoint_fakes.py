"""An in-memory tunemesh.v1.CheckpointService on an in-process gRPC server, for SDK and CLI tests.

It records each call's authorization metadata and every request it receives, serves
files in chunks of `chunk_bytes`, and can be told to lie: `bad_sha` announces a wrong
sha256, `file_names` overrides the announced (and streamed) file names.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent import futures

import grpc

from tunemesh.errors import error_for, to_status
from tunemesh.v1 import checkpoints_pb2, checkpoints_pb2_grpc, types_pb2

API_KEY = "tm-test-key"
CHUNK_BYTES = 4096


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, reason: str, message: str):
    context.abort_with_status(to_status(error_for(code, reason, message)))


class FakeCheckpoints(checkpoints_pb2_grpc.CheckpointServiceServicer):
    """Checkpoints by path, each with its files' bytes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.checkpoints: dict[str, checkpoints_pb2.Checkpoint] = {}
        self.contents: dict[str, dict[str, bytes]] = {}
        self.auth: list[str | None] = []
        self.requests: list[object] = []
        self.imports: list[list[checkpoints_pb2.ImportCheckpointRequest]] = []
        self.bad_sha = False
        self.file_names: dict[str, str] = {}

    def add(self, run: str, kind: str, name: str, files: dict[str, bytes], step: int = 0) -> str:
        """Store a checkpoint and return its path."""
        path = f"tunemesh://runs/{run}/{kind}/{name}" if run else f"tunemesh://imports/{name}"
        kinds = {
            "state": checkpoints_pb2.CHECKPOINT_KIND_STATE,
            "sampler": checkpoints_pb2.CHECKPOINT_KIND_SAMPLER,
            "imported": checkpoints_pb2.CHECKPOINT_KIND_IMPORTED,
        }
        msg = checkpoints_pb2.Checkpoint(
            path=path, kind=kinds[kind], run=f"runs/{run}" if run else "", name=name,
            base_model="tiny-dense", lora_config=types_pb2.LoraConfig(
                rank=8, alpha=16.0, train_mlp=True, train_attn=True, train_unembed=True
            ),
            step=step, has_optimizer_state=kind == "state",
            size_bytes=sum(len(b) for b in files.values()),
            files=[
                checkpoints_pb2.CheckpointFile(
                    name=n, size_bytes=len(b), sha256=hashlib.sha256(b).hexdigest()
                )
                for n, b in files.items()
            ],
        )
        msg.create_time.FromSeconds(1_700_000_000)
        with self.lock:
            self.checkpoints[path] = msg
            self.contents[path] = dict(files)
        return path

    def _check(self, request, context) -> None:
        auth = dict(context.invocation_metadata()).get("authorization")
        with self.lock:
            self.auth.append(auth)
            self.requests.append(request)
        if auth != f"Bearer {API_KEY}":
            abort(context, grpc.StatusCode.UNAUTHENTICATED, "BAD_API_KEY", "unknown API key")

    def _get(self, path: str, context) -> checkpoints_pb2.Checkpoint:
        with self.lock:
            msg = self.checkpoints.get(path)
        if msg is None:
            abort(context, grpc.StatusCode.NOT_FOUND, "CHECKPOINT_NOT_FOUND", f"no checkpoint {path}")
        return msg

    def ListCheckpoints(self, request, context):
        self._check(request, context)
        with self.lock:
            paths = sorted(p for p, c in self.checkpoints.items()
                           if not request.run or c.run == request.run)
        start = int(request.page_token or 0)
        end = start + (request.page_size or 100)
        return checkpoints_pb2.ListCheckpointsResponse(
            checkpoints=[self.checkpoints[p] for p in paths[start:end]],
            next_page_token=str(end) if end < len(paths) else "",
        )

    def GetCheckpoint(self, request, context):
        self._check(request, context)
        return checkpoints_pb2.GetCheckpointResponse(checkpoint=self._get(request.path, context))

    def DeleteCheckpoint(self, request, context):
        self._check(request, context)
        self._get(request.path, context)
        with self.lock:
            del self.checkpoints[request.path]
        return checkpoints_pb2.DeleteCheckpointResponse()

    def UpdateCheckpointTtl(self, request, context):
        self._check(request, context)
        msg = checkpoints_pb2.Checkpoint()
        msg.CopyFrom(self._get(request.path, context))
        if request.ttl_seconds:
            msg.expire_time.FromSeconds(msg.create_time.seconds + request.ttl_seconds)
        else:
            msg.ClearField("expire_time")
        with self.lock:
            self.checkpoints[request.path] = msg
        return checkpoints_pb2.UpdateCheckpointTtlResponse(checkpoint=msg)

    def DownloadCheckpoint(self, request, context):
        self._check(request, context)
        msg = checkpoints_pb2.Checkpoint()
        msg.CopyFrom(self._get(request.path, context))
        for entry in msg.files:
            entry.name = self.file_names.get(entry.name, entry.name)
            if self.bad_sha:
                entry.sha256 = "0" * 64
        yield checkpoints_pb2.DownloadCheckpointResponse(checkpoint=msg)
        for name, data in self.contents[request.path].items():
            name = self.file_names.get(name, name)
            for offset in range(0, len(data), CHUNK_BYTES):
                chunk = checkpoints_pb2.FileChunk(
                    file_name=name, offset=offset, data=data[offset:offset + CHUNK_BYTES]
                )
                yield checkpoints_pb2.DownloadCheckpointResponse(chunk=chunk)

    def ImportCheckpoint(self, request_iterator, context):
        received = list(request_iterator)
        self._check(received[0] if received else None, context)
        self.imports.append(received)
        header = received[0].header
        files: dict[str, bytearray] = {}
        for request in received[1:]:
            chunk = request.chunk
            buf = files.setdefault(chunk.file_name, bytearray())
            if chunk.offset != len(buf):
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, "BAD_OFFSET", "out of order")
            buf.extend(chunk.data)
        path = self.add("", "imported", header.name, {n: bytes(b) for n, b in files.items()})
        with self.lock:
            msg = self.checkpoints[path]
            msg.base_model = header.base_model
            msg.user_metadata.update(header.user_metadata)
        return checkpoints_pb2.ImportCheckpointResponse(checkpoint=msg)


def serve(servicer: FakeCheckpoints) -> tuple[grpc.Server, int]:
    """Start an in-process server on a free loopback port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    checkpoints_pb2_grpc.add_CheckpointServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port
