"""What a stored checkpoint is: its blobs, its manifest (JSON), and the key rules."""

from __future__ import annotations

import dataclasses
import json

from tunemesh_common.checkpoints.paths import is_segment
from tunemesh.errors import DataLossError, InvalidArgumentError, NotFoundError

MANIFEST_NAME = "manifest.json"
_MANIFEST_TMP = MANIFEST_NAME + ".tmp"
_FORMAT = 1
_MAX_KEY_CHARS = 1024


@dataclasses.dataclass(frozen=True)
class BlobInfo:
    """One file of a checkpoint."""

    name: str
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a committed checkpoint holds, and the caller's metadata."""

    key: str
    blobs: tuple[BlobInfo, ...]
    metadata: dict = dataclasses.field(hash=False)
    commit_time: float

    @property
    def size_bytes(self) -> int:
        return sum(b.size for b in self.blobs)

    def blob(self, name: str) -> BlobInfo:
        for info in self.blobs:
            if info.name == name:
                return info
        raise NotFoundError("BLOB_NOT_FOUND", f"checkpoint {self.key!r} has no blob {name!r}")


def validate_key(key: str) -> None:
    """InvalidArgumentError("BAD_CHECKPOINT_KEY") unless every segment is a safe name."""
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY_CHARS:
        raise InvalidArgumentError("BAD_CHECKPOINT_KEY", f"bad checkpoint key {key!r}")
    for segment in key.split("/"):
        if not _is_segment(segment):
            raise InvalidArgumentError("BAD_CHECKPOINT_KEY", f"bad checkpoint key {key!r}")


def validate_blob_name(name: str) -> None:
    """InvalidArgumentError("BAD_BLOB_NAME") unless name is one safe, non-reserved segment."""
    if not _is_segment(name) or name in (MANIFEST_NAME, _MANIFEST_TMP):
        raise InvalidArgumentError("BAD_BLOB_NAME", f"bad blob name {name!r}")


def _is_segment(text: object) -> bool:
    return isinstance(text, str) and is_segment(text)


def canonical_metadata(metadata: dict) -> dict:
    """A JSON round-trip copy of metadata; InvalidArgumentError if it is not a JSON object."""
    if not isinstance(metadata, dict):
        raise InvalidArgumentError("BAD_METADATA", "checkpoint metadata must be a dict")
    try:
        return json.loads(json.dumps(metadata, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError("BAD_METADATA", f"checkpoint metadata is not JSON: {err}") from None


def manifest_json(manifest: Manifest) -> bytes:
    doc = {
        "format": _FORMAT,
        "key": manifest.key,
        "commit_time": manifest.commit_time,
        "metadata": manifest.metadata,
        "blobs": [dataclasses.asdict(b) for b in manifest.blobs],
    }
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def parse_manifest(key: str, raw: bytes) -> Manifest:
    """Manifest from manifest.json bytes; DataLossError("CORRUPT_MANIFEST") if malformed."""
    try:
        doc = json.loads(raw)
        if doc["format"] != _FORMAT or doc["key"] != key or not isinstance(doc["metadata"], dict):
            raise ValueError("unexpected format, key or metadata")
        blobs = tuple(_parse_blob(b) for b in doc["blobs"])
        return Manifest(key, blobs, doc["metadata"], float(doc["commit_time"]))
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise DataLossError("CORRUPT_MANIFEST", f"manifest of checkpoint {key!r} is corrupt: {err}") from None


def _parse_blob(doc: dict) -> BlobInfo:
    name, size, sha256 = doc["name"], doc["size"], doc["sha256"]
    if not _is_segment(name) or type(size) is not int or size < 0 or not isinstance(sha256, str):
        raise ValueError(f"bad blob entry {doc!r}")
    return BlobInfo(name, size, sha256)
