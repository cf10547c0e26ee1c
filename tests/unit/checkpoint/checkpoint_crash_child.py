"""Child process for test_checkpoint_store_crash: writes a checkpoint until killed.

Usage: checkpoint_crash_child.py ROOT KEY MODE
  mid-write      writes a blob in small chunks forever; prints WRITING once underway
  before-commit  writes its blobs, prints BLOBS_WRITTEN, then waits on stdin to commit
"""

from __future__ import annotations

import itertools
import pathlib
import sys
import time

from tunemesh_checkpoint.store import FilesystemStore


def endless_chunks():
    for i in itertools.count():
        if i == 64:
            print("WRITING", flush=True)
        yield bytes([i % 256]) * 4096
        if i >= 64:
            time.sleep(0.001)


def main() -> None:
    root, key, mode = sys.argv[1:4]
    store = FilesystemStore(pathlib.Path(root))
    writer = store.writer(key)
    if mode == "mid-write":
        writer.write_blob("adapter_model.safetensors", endless_chunks())
    elif mode == "before-commit":
        writer.write_blob("adapter_model.safetensors", [b"w" * 65536] * 16)
        writer.write_blob("adapter_config.json", [b'{"r": 8}'])
        print("BLOBS_WRITTEN", flush=True)
        sys.stdin.readline()
        writer.commit({"from": "child"})
    else:
        sys.exit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
