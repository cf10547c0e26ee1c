"""`tunemesh up --models-file / --{trainer,sampler}-device / -dtype / --sampler-kv-cache-bytes / -fraction`:
what reaches the service command lines, and the checks made before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunemesh.errors import InvalidArgumentError
from tunemesh_local import cli, launcher
from tunemesh_local.launcher import MeshConfig


def _argv(config: MeshConfig, role: str) -> list[str]:
    specs = launcher.default_services(config, "127.0.0.1:2379", config.state_dir / "keys.json")
    return list(next(s for s in specs if s.role == role).argv)


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_set_flags_reach_trainers_and_samplers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models.json"
    models.write_text("[]")
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args([
        "up", "--models-file", "models.json", "--trainer-device", "auto", "--trainer-dtype", "bfloat16",
        "--sampler-device", "cuda:1", "--sampler-dtype", "auto", "--sampler-kv-cache-bytes", "2GiB",
        "--sampler-kv-cache-fraction", "0.6"])
    config = MeshConfig(state_dir=tmp_path, models_file=args.models_file, trainer_device=args.trainer_device,
                        trainer_dtype=args.trainer_dtype, sampler_device=args.sampler_device,
                        sampler_dtype=args.sampler_dtype, sampler_kv_cache_bytes=args.sampler_kv_cache_bytes,
                        sampler_kv_cache_fraction=args.sampler_kv_cache_fraction)
    trainer, sampler = _argv(config, "trainer"), _argv(config, "sampler")
    assert _flag(trainer, "--models-file") == _flag(sampler, "--models-file") == str(models)  # absolute
    assert (_flag(trainer, "--device"), _flag(trainer, "--dtype")) == ("auto", "bfloat16")
    assert (_flag(sampler, "--device"), _flag(sampler, "--dtype"), _flag(sampler, "--kv-cache-bytes")) == (
        "cuda:1", "auto", "2GiB")
    assert _flag(sampler, "--kv-cache-fraction") == "0.6"
    assert "--kv-cache-bytes" not in trainer and "--kv-cache-fraction" not in trainer


def test_unset_flags_leave_the_services_own_settings(tmp_path: Path) -> None:
    for role in ("trainer", "sampler"):
        argv = _argv(MeshConfig(state_dir=tmp_path), role)
        assert not {"--models-file", "--device", "--dtype", "--kv-cache-bytes", "--kv-cache-fraction"} & set(argv), role


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"trainer_device": "gpu0"}, "BAD_DEVICE"),
    ({"sampler_device": "cuda:x"}, "BAD_DEVICE"),
    ({"sampler_dtype": "float16"}, "BAD_DTYPE"),
    ({"trainer_dtype": "auto"}, "BAD_DTYPE"),  # the trainer stays float32 unless asked
    ({"sampler_kv_cache_fraction": 1.5}, "BAD_KV_CACHE_FRACTION"),
    ({"models_file": Path("no-such-models.json")}, "BAD_MODELS_FILE"),
])
def test_bad_values_are_refused_before_anything_starts(tmp_path: Path, overrides: dict, reason: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        launcher.up(MeshConfig(state_dir=tmp_path / "state", **overrides))
    assert err.value.reason == reason
    assert not (tmp_path / "state" / "mesh.json").exists()
