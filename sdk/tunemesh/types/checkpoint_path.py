"""ParsedCheckpointTinkerPath: a checkpoint path split the way Tinker splits it.

    tinker://{run_id}/weights/{name}          tunemesh://runs/{run_id}/state/{name}
    tinker://{run_id}/sampler_weights/{name}  tunemesh://runs/{run_id}/sampler/{name}
    tinker://imports/sampler_weights/{name}   tunemesh://imports/{name}

Both spellings parse; a tinker:// path names a tunemesh run by its bare id (as the
gateway does for runs it did not create). Tinker's `external_weights` checkpoints have
no tunemesh counterpart: they parse, but `tunemesh_path` refuses them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

CheckpointType = Literal["training", "sampler", "external"]

TINKER_SCHEME = "tinker://"
TUNEMESH_SCHEME = "tunemesh://"
IMPORTS = "imports"  # the training_run_id of imported checkpoints
_TYPE_BY_SEGMENT: dict[str, CheckpointType] = {
    "weights": "training", "sampler_weights": "sampler", "external_weights": "external",
}
_SEGMENT_BY_KIND = {"state": "weights", "sampler": "sampler_weights"}
_KIND_BY_TYPE = {"training": "state", "sampler": "sampler"}


@dataclasses.dataclass(frozen=True)
class ParsedCheckpointTinkerPath:
    """`tinker_path` as given; `training_run_id` the run's id (`runs/{id}` from a
    tunemesh path, `{id}` from a tinker one, `imports` for an import); `checkpoint_id`
    Tinker's `{weights|sampler_weights|external_weights}/{name}`."""

    tinker_path: str
    training_run_id: str
    checkpoint_type: CheckpointType
    checkpoint_id: str

    @classmethod
    def from_tinker_path(cls, tinker_path: str) -> ParsedCheckpointTinkerPath:
        """Parse a tinker:// or tunemesh:// checkpoint path; ValueError if it is neither."""
        if isinstance(tinker_path, str) and tinker_path.startswith(TUNEMESH_SCHEME):
            return cls._from_tunemesh(tinker_path)
        if not isinstance(tinker_path, str) or not tinker_path.startswith(TINKER_SCHEME):
            raise _invalid(tinker_path)
        parts = tinker_path[len(TINKER_SCHEME):].split("/")
        if len(parts) != 3 or not all(parts) or parts[1] not in _TYPE_BY_SEGMENT:
            raise _invalid(tinker_path)
        run_id, segment, name = parts
        return cls(tinker_path, run_id, _TYPE_BY_SEGMENT[segment], f"{segment}/{name}")

    @classmethod
    def _from_tunemesh(cls, path: str) -> ParsedCheckpointTinkerPath:
        parts = path[len(TUNEMESH_SCHEME):].split("/")
        if not all(parts):
            raise _invalid(path)
        if len(parts) == 2 and parts[0] == IMPORTS:
            return cls(path, IMPORTS, "sampler", f"sampler_weights/{parts[1]}")
        if len(parts) == 4 and parts[0] == "runs" and parts[2] in _SEGMENT_BY_KIND:
            segment = _SEGMENT_BY_KIND[parts[2]]
            return cls(path, f"runs/{parts[1]}", _TYPE_BY_SEGMENT[segment], f"{segment}/{parts[3]}")
        raise _invalid(path)

    @property
    def name(self) -> str:
        """The checkpoint's own name, the last segment."""
        return self.checkpoint_id.partition("/")[2]

    @property
    def run(self) -> str:
        """The tunemesh run that wrote it, `runs/{id}` ("" for an import)."""
        if self.training_run_id == IMPORTS:
            return ""
        return f"runs/{self.training_run_id.removeprefix('runs/')}"

    @property
    def tunemesh_path(self) -> str:
        """The tunemesh:// path of the checkpoint; ValueError for external weights."""
        if self.checkpoint_type == "external":
            raise ValueError(f"{self.tinker_path!r}: tunemesh has no external_weights checkpoints")
        if not self.run:
            return f"{TUNEMESH_SCHEME}{IMPORTS}/{self.name}"
        return f"{TUNEMESH_SCHEME}{self.run}/{_KIND_BY_TYPE[self.checkpoint_type]}/{self.name}"


def _invalid(path: object) -> ValueError:
    return ValueError(
        f"Invalid tinker path: {str(path)[:140]!r}; expected tinker://<run>/<weights|sampler_weights>/<name>"
        " or a tunemesh:// checkpoint path"
    )
