"""An import of a PEFT adapter directory, streamed: `adapter_model.safetensors` goes to
the store chunk by chunk as it arrives (its header is checked as soon as it is whole,
its size and sha256 computed as it is written), `adapter_config.json` (small) is kept
and checked; the checkpoint is published only once both are whole and agree, with the
config normalized. Any refusal leaves nothing behind (the writer is aborted)."""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable, Iterable, Iterator

from tunemesh_common.lora import peft_format
from tunemesh_checkpoint.store import BlobInfo, CheckpointWriter
from tunemesh.errors import InvalidArgumentError

CONFIG_MAX_BYTES = 1 << 20
HEADER_MAX_BYTES = 16 << 20  # a safetensors header kept while its file streams (a LoRA's: kilobytes)
_FILES = (peft_format.CONFIG_FILE, peft_format.WEIGHTS_FILE)
_UNKNOWN_SIZE = 1 << 62  # the file's length while it is still arriving


class AdapterImport:
    """Files in, then `commit()`; as a context manager it aborts unless committed.
    `commit(writer, spec, blobs)` is the catalog's publish step."""

    def __init__(self, writer: CheckpointWriter, spec, commit: Callable) -> None:
        self._writer, self._spec, self._commit = writer, spec, commit
        self._config: bytes | None = None
        self._weights: tuple[BlobInfo, dict] | None = None

    @property
    def committed(self) -> bool:
        return self._writer.committed

    def write_file(self, name: str, chunks: Iterable[bytes]) -> None:
        """Take one file of the adapter (each once)."""
        if name == peft_format.CONFIG_FILE:
            self._config = _joined(chunks, CONFIG_MAX_BYTES)
        elif name == peft_format.WEIGHTS_FILE:
            head = SafetensorsHead()
            info = self._writer.write_blob(name, head.watch(chunks))
            self._weights = info, head.tensors(info.size)
        else:
            raise _bad_files(f"unexpected file {name[:100]!r}")

    def commit(self):
        """Check the pair, write the normalized config and publish; the CheckpointRecord."""
        if self._config is None or self._weights is None:
            missing = [n for n, got in zip(_FILES, (self._config, self._weights)) if got is None]
            raise _bad_files(f"missing {missing}")
        weights, tensors = self._weights
        config = peft_format.parse_config(self._config)
        modules = peft_format.check_factors(tensors, config.rank, config.target_parameters)
        lora = {"rank": config.rank, "alpha": config.alpha, **peft_format.lora_switches(modules), "seed": 0}
        normalized = peft_format.build_config(self._spec.base_model, config.rank, config.alpha, sorted(modules))
        raw = (json.dumps(normalized, indent=2, sort_keys=True) + "\n").encode()
        written = [self._writer.write_blob(peft_format.CONFIG_FILE, [raw]), weights]
        return self._commit(self._writer, dataclasses.replace(self._spec, lora=lora), written)

    def abort(self) -> None:
        self._writer.abort()

    def __enter__(self) -> AdapterImport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.committed:
            self.abort()


class SafetensorsHead:
    """Keeps the first bytes of a safetensors stream, up to the end of its header."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._wanted = 8  # bytes of the head: 8 + the header length once known

    def watch(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """`chunks`, passed through; a malformed header raises as soon as it is whole."""
        for chunk in chunks:
            if len(self._head) < self._wanted:
                self._take(memoryview(chunk))
            yield chunk

    def tensors(self, size: int) -> dict[str, peft_format.TensorHeader]:
        """The tensors of the whole file (`size` bytes), offsets checked against it."""
        return peft_format.read_header(_FilePrefix(bytes(self._head), size))

    def _take(self, view: memoryview) -> None:
        while view and len(self._head) < self._wanted:
            taken = self._wanted - len(self._head)
            self._head += view[:taken]
            view = view[taken:]
            if self._wanted == 8 and len(self._head) == 8:
                (length,) = struct.unpack("<Q", self._head)
                if length > HEADER_MAX_BYTES:
                    raise InvalidArgumentError("BAD_SAFETENSORS", f"{peft_format.WEIGHTS_FILE}: a header of {length} "
                                                                  f"bytes (imports take up to {HEADER_MAX_BYTES})")
                self._wanted = 8 + length
        if len(self._head) == self._wanted:
            self.tensors(_UNKNOWN_SIZE)  # all but the offsets' bound, which needs the length


class _FilePrefix:
    """The head of a file of `size` bytes, as `peft_format.read_header` reads a file."""

    def __init__(self, head: bytes, size: int) -> None:
        self._head, self._size = head, size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: slice) -> bytes:
        return self._head[index]


def _joined(chunks: Iterable[bytes], limit: int) -> bytes:
    data = bytearray()
    for chunk in chunks:
        data += chunk
        if len(data) > limit:
            raise InvalidArgumentError("BAD_ADAPTER_CONFIG", f"{peft_format.CONFIG_FILE} is over {limit} bytes")
    return bytes(data)


def _bad_files(what: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        "BAD_CHECKPOINT_FILES",
        f"an import holds exactly {peft_format.CONFIG_FILE} and {peft_format.WEIGHTS_FILE} ({what})",
    )
