"""A Hugging Face hub cache, written without the hub: one snapshot per model.

Layout (what `huggingface_hub` reads, e.g. for `AutoTokenizer.from_pretrained("org/name")`
with HF_HUB_OFFLINE=1):

    <hub dir>/models--ORG--NAME/refs/main               the revision, no newline
    <hub dir>/models--ORG--NAME/snapshots/<revision>/   the files, as plain files

The revision is a digest of the files (40 hex digits, like a git commit id), so writing
the same files again changes nothing. A snapshot appears whole, by renaming a staging
directory, before `refs/main` (replaced atomically) names it: a concurrent reader sees the
old snapshot or the new one, never part of one. Older snapshots stay (a reader may still
be in one); they are a few files each.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePath

from tunemesh.tokenizer import content_hash

REVISION_LENGTH = 40
# huggingface_hub's rule for a repo id (`validate_repo_id`): `name` or `org/name`, word
# characters, `-` and `.`, at most 96 characters a part, no `--` or `..`.
_REPO_ID = re.compile(r"^(\b[\w\-.]+\b/)?\b[\w\-.]{1,96}\b$")


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One model's snapshot in the cache; `changed` is False when it was there already."""

    model: str
    revision: str
    path: Path
    files: tuple[str, ...]
    changed: bool


def hub_dir(hf_home: Path | None, env: Mapping[str, str]) -> Path:
    """Where Hugging Face loaders look, as huggingface_hub works it out: `<hf_home>/hub`
    when given, else $HF_HUB_CACHE, else $HF_HOME/hub, else
    ${XDG_CACHE_HOME:-~/.cache}/huggingface/hub."""
    if hf_home is not None:
        return Path(hf_home).expanduser().absolute() / "hub"
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    cache = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return cache.expanduser() / "huggingface" / "hub"


def repo_folder(model: str) -> str:
    """`models--ORG--NAME` for `ORG/NAME`; ValueError for a name no hub loader accepts."""
    if not _REPO_ID.match(model) or "--" in model or ".." in model or model.endswith(".git"):
        raise ValueError(f"{model!r} is not a Hugging Face model id (ORG/NAME)")
    return "models--" + model.replace("/", "--")


def revision_of(files: Mapping[str, bytes]) -> str:
    """The revision of a snapshot holding `files`: a digest of their names and bytes."""
    return content_hash(list(files.items()))[:REVISION_LENGTH]


def write_snapshot(hub: Path, model: str, files: Mapping[str, bytes]) -> Snapshot:
    """Make `files` the `main` revision of `model` in the cache at `hub`.

    ValueError, writing nothing, for a model name that is not a hub model id, no files, or
    a file name that is not a plain file name."""
    repo = hub / repo_folder(model)
    if not files:
        raise ValueError("no files to write")
    for name in files:
        if not name or name != PurePath(name).name or name.startswith(".") or "\\" in name:
            raise ValueError(f"refusing file name {name!r}")
    revision = revision_of(files)
    snapshot = repo / "snapshots" / revision
    changed = not _holds(snapshot, files)
    if changed:
        _publish(snapshot, files)
    if _read_ref(repo) != revision:
        _replace_file(repo / "refs" / "main", revision.encode())
        changed = True
    return Snapshot(model, revision, snapshot, tuple(sorted(files)), changed)


def _holds(snapshot: Path, files: Mapping[str, bytes]) -> bool:
    if not snapshot.is_dir():
        return False
    try:
        return {p.name for p in snapshot.iterdir()} == set(files) and all(
            (snapshot / name).read_bytes() == content for name, content in files.items())
    except OSError:
        return False


def _publish(snapshot: Path, files: Mapping[str, bytes]) -> None:
    """Write the files into a staging directory beside `snapshot`, then rename it there;
    a damaged snapshot of the same revision (not written by this module) is replaced."""
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=snapshot.parent))
    try:
        for name, content in files.items():
            with open(staging / name, "wb") as out:
                out.write(content)
                out.flush()
                os.fsync(out.fileno())
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700
        if snapshot.exists() and not _holds(snapshot, files):  # same revision, other content: damaged
            doomed = Path(tempfile.mkdtemp(prefix=".replaced-", dir=snapshot.parent))
            os.rename(snapshot, doomed / "old")
            shutil.rmtree(doomed, ignore_errors=True)
        try:
            os.rename(staging, snapshot)
        except OSError:
            if not _holds(snapshot, files):  # not a concurrent writer of the same files
                raise
        _fsync_dir(snapshot.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_ref(repo: Path) -> str | None:
    try:
        return (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None


def _replace_file(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
