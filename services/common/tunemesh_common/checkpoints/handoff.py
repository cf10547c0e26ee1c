"""Checkpoint files handed to a checkpoint service on the same host, by rename.

A trainer on the checkpoint service's host (`tunemesh up` runs every process on one)
need not stream a checkpoint's bytes through gRPC and TLS: it writes the files into the
service's handoff directory and calls AdoptCheckpoint, and the service moves them into its
store (one rename each: same filesystem). A SmolLM2 snapshot is 68 MB; streamed, it costs
both processes about 7 ms of CPU per MB (copies, TLS, gRPC framing, sha256, page cache),
which on a small host comes out of the training engine's core.

    <handoff_dir>/<token>/<file>     one directory per checkpoint being handed over

The caller makes a fresh <token> directory, writes each file (hashing it on the way) and
flushes it to disk; the service takes them, then removes the <token> directory, whether it
took them or refused. A caller that dies first leaves it behind; the service removes such
leftovers once they are old (`tunemesh_checkpoint.handoff`).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import secrets
import shutil

from tunemesh.v1 import checkpoints_pb2

TOKEN = re.compile(r"[0-9a-f]{32}")  # a handoff directory's name


def write_files(handoff_dir: pathlib.Path, files: dict[str, list]) -> tuple[str, list[checkpoints_pb2.CheckpointFile]]:
    """Write `files` (name -> buffers in order) into a fresh directory under `handoff_dir`,
    each flushed to disk; returns the directory's token and each file's name, size and
    sha256. On error nothing is left behind."""
    token = secrets.token_hex(16)
    directory = handoff_dir / token
    directory.mkdir(mode=0o700)
    try:
        described = [_write_file(directory / name, name, parts) for name, parts in files.items()]
    except BaseException:
        discard(handoff_dir, token)
        raise
    return token, described


def discard(handoff_dir: pathlib.Path, token: str) -> None:
    """Remove what is left of a handoff (nothing, once the service took it)."""
    shutil.rmtree(handoff_dir / token, ignore_errors=True)


def _write_file(path: pathlib.Path, name: str, parts: list) -> checkpoints_pb2.CheckpointFile:
    digest, size = hashlib.sha256(), 0
    with open(path, "xb") as file:
        for part in parts:
            view = memoryview(part).cast("B")
            digest.update(view)
            file.write(view)
            size += len(view)
        file.flush()
        os.fsync(file.fileno())
    return checkpoints_pb2.CheckpointFile(name=name, size_bytes=size, sha256=digest.hexdigest())
