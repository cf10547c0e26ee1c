"""`tunemesh up --trainer-ranks R --trainer-expert-parallel P`: the trainer command line and
the checks made before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunemesh.errors import InvalidArgumentError
from tunemesh_local import launcher
from tunemesh_local.launcher import MeshConfig


def _trainer_argv(config: MeshConfig) -> list[str]:
    specs = launcher.default_services(config, "127.0.0.1:2379", config.state_dir / "keys.json")
    return list(next(s for s in specs if s.role == "trainer").argv)


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_ranks_and_expert_parallel_reach_the_trainer(tmp_path: Path) -> None:
    argv = _trainer_argv(MeshConfig(state_dir=tmp_path, trainer_ranks=2, trainer_expert_parallel=2))
    assert _flag(argv, "--ranks") == "2"
    assert _flag(argv, "--expert-parallel") == "2"


def test_defaults_give_a_single_process_trainer(tmp_path: Path) -> None:
    argv = _trainer_argv(MeshConfig(state_dir=tmp_path))
    assert _flag(argv, "--ranks") is None and _flag(argv, "--expert-parallel") is None


@pytest.mark.parametrize(("ranks", "expert_parallel"), [(2, 3), (1, 2), (2, 0)])
def test_expert_parallel_must_divide_the_ranks(tmp_path: Path, ranks: int, expert_parallel: int) -> None:
    config = MeshConfig(state_dir=tmp_path / "state", trainer_ranks=ranks, trainer_expert_parallel=expert_parallel)
    with pytest.raises(InvalidArgumentError) as err:
        launcher.up(config)
    assert err.value.reason == "BAD_EXPERT_PARALLEL"
    assert not (tmp_path / "state" / "mesh.json").exists()  # refused before anything started
