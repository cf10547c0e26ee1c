"""Service settings (pydantic-settings): flags over `TUNEMESH_<SERVICE>_*` over defaults,
validation that names the flag and the variable, and `--help` documenting every field."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from pydantic import ValidationError

from tunemesh_checkpoint.settings import CheckpointSettings
from tunemesh_common.service import settings
from tunemesh_sampler.settings import SamplerSettings
from tunemesh_scheduler.settings import SchedulerSettings, api_keys
from tunemesh_trainer.settings import TrainerSettings

CLASSES = {"checkpoint": CheckpointSettings, "sampler": SamplerSettings, "scheduler": SchedulerSettings,
           "trainer": TrainerSettings}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting of the machine running the tests leaks in; help lines are not wrapped."""
    for name in list(os.environ):
        if name.startswith(tuple(f"TUNEMESH_{service.upper()}_" for service in CLASSES)):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "250")


@pytest.mark.parametrize("service", sorted(CLASSES))
def test_flags_win_over_the_environment_which_wins_over_defaults(service: str, monkeypatch) -> None:
    cls = CLASSES[service]
    default = cls.model_fields["metrics_listen"].default
    assert settings.load(cls, []).metrics_listen == default == "127.0.0.1:0"
    monkeypatch.setenv(f"TUNEMESH_{service.upper()}_METRICS_LISTEN", "127.0.0.1:9100")
    assert settings.load(cls, []).metrics_listen == "127.0.0.1:9100"
    assert settings.load(cls, ["--metrics-listen", "127.0.0.1:9200"]).metrics_listen == "127.0.0.1:9200"
    assert settings.load(cls, ["--metrics-listen="]).metrics_listen == ""  # empty: no endpoint


def test_values_are_parsed_by_type(monkeypatch) -> None:
    monkeypatch.setenv("TUNEMESH_SCHEDULER_DURABLE", "false")
    monkeypatch.setenv("TUNEMESH_SCHEDULER_BATCH_WAIT_MS", "20")
    s = settings.load(SchedulerSettings, ["--store-timeout-s", "1.5", "--api-keys", "k1=alice,k2=bob",
                                          "--ready-file", "~/r.json"])
    assert (s.durable, s.batch_wait_ms, s.store_timeout_s) == (False, 20, 1.5)
    assert s.ready_file == pathlib.Path.home() / "r.json"  # paths have ~ expanded
    assert api_keys(s) == {"k1": "alice", "k2": "bob"}
    assert "k1" not in repr(s)  # the inline keys are a secret
    sampler = settings.load(SamplerSettings, ["--kv-cache-bytes", "512MiB", "--device", "cuda:1",
                                              "--kv-cache-fraction", "0.5", "--dtype", "bfloat16"])
    assert (sampler.kv_cache_bytes, sampler.device, sampler.dtype) == (512 << 20, "cuda:1", "bfloat16")
    assert sampler.kv_cache_fraction == 0.5
    checkpoint = settings.load(CheckpointSettings, [])
    assert checkpoint.root_dir == pathlib.Path.home() / ".tunemesh" / "checkpoints"


def test_defaults_use_the_host_s_accelerator() -> None:
    """Devices default to auto (cuda when there is one); the sampler's dtype to auto (bfloat16 on a
    GPU, float32 on CPU: tunemesh_sampler.engine.resolve_dtype); the trainer stays float32."""
    trainer, sampler = settings.load(TrainerSettings, []), settings.load(SamplerSettings, [])
    assert (trainer.device, trainer.dtype, sampler.device, sampler.dtype) == ("auto", "float32", "auto", "auto")
    assert (sampler.kv_cache_bytes, sampler.kv_cache_fraction, sampler.engine) == (1 << 30, 0.9, "auto")
    assert (trainer.ranks, trainer.expert_parallel, trainer.models_file) == (1, 1, None)


def test_settings_are_frozen() -> None:
    s = settings.load(TrainerSettings, [])
    with pytest.raises(ValidationError):
        s.max_adapters = 3


@pytest.mark.parametrize(("cls", "argv", "env", "expected"), [
    (TrainerSettings, [], {"TUNEMESH_TRAINER_MAX_ADAPTERS": "many"},
     "--max-adapters (TUNEMESH_TRAINER_MAX_ADAPTERS): Input should be a valid integer"),
    (TrainerSettings, ["--max-adapters", "0"], {}, "--max-adapters (TUNEMESH_TRAINER_MAX_ADAPTERS): Input should be "
                                                   "greater than or equal to 1 (got '0')"),
    (TrainerSettings, ["--dtype", "float16"], {}, "--dtype (TUNEMESH_TRAINER_DTYPE): Input should be 'float32' or "
                                                  "'bfloat16'"),
    (SamplerSettings, ["--device", "gpu"], {}, "--device (TUNEMESH_SAMPLER_DEVICE): Value error, expected cpu, cuda, "
                                               "cuda:N or auto (got 'gpu')"),
    (SamplerSettings, ["--engine", "tensorrt"], {}, "--engine (TUNEMESH_SAMPLER_ENGINE)"),
    (SamplerSettings, ["--kv-cache-fraction", "1.5"], {}, "--kv-cache-fraction (TUNEMESH_SAMPLER_KV_CACHE_FRACTION): "
                                                          "Input should be less than or equal to 1"),
    (CheckpointSettings, ["--listen", "localhost"], {}, "--listen (TUNEMESH_CHECKPOINT_LISTEN): Value error, "
                                                        "expected host:port"),
    (SchedulerSettings, [], {"TUNEMESH_SCHEDULER_DURABLE": "maybe"}, "--durable (TUNEMESH_SCHEDULER_DURABLE)"),
])
def test_a_bad_value_exits_naming_the_flag_and_the_variable(cls, argv, env, expected, monkeypatch, capsys) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        settings.load(cls, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m tunemesh_{cls.model_config['env_prefix'][9:-1].lower()}: invalid settings")
    assert expected in err


def test_a_bad_secret_is_not_repeated(capsys) -> None:
    with pytest.raises(SystemExit):
        settings.load(SchedulerSettings, ["--api-keys", "sk-secret-1=alice,sk-secret-2"])
    err = capsys.readouterr().err
    assert "--api-keys (TUNEMESH_SCHEDULER_API_KEYS): Value error, entry 'sk-secret-2' is not key=tenant" in err
    assert "sk-secret-1" not in err


def test_an_unknown_flag_exits(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        settings.load(TrainerSettings, ["--max-adapter", "3"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --max-adapter 3" in capsys.readouterr().err


@pytest.mark.parametrize("service", sorted(CLASSES))
def test_help_documents_every_field(service: str, capsys) -> None:
    cls = CLASSES[service]
    with pytest.raises(SystemExit) as exit_:
        settings.load(cls, ["--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert help_text.startswith(f"usage: python -m tunemesh_{service}")
    for name, field in cls.model_fields.items():
        assert field.description, name
        flag, env = "--" + name.replace("_", "-"), f"TUNEMESH_{service.upper()}_{name.upper()}"
        assert f"{flag} " in help_text and f"[env: {env}]" in help_text, name
        assert " ".join(field.description.split()) in help_text, name


def test_python_m_service_help_runs_main() -> None:
    out = subprocess.run([sys.executable, "-m", "tunemesh_sampler", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "250"}, timeout=120, check=True).stdout
    assert "--kv-cache-bytes ByteSize" in out and "[env: TUNEMESH_SAMPLER_KV_CACHE_BYTES]" in out


@pytest.mark.parametrize(("argv", "message"), [
    ([], "no API keys: pass --api-keys-file F (make one with `tunemesh keys create"),
    (["--api-keys", "k1=alice"], "--api-keys holds plain-text keys: development only, add --insecure-dev-keys true"),
    (["--insecure-dev-keys", "true"], "no API keys"),  # the flag alone brings no well-known keys
])
def test_the_scheduler_refuses_to_start_without_keys_or_with_unflagged_plain_text(argv, message) -> None:
    from tunemesh_scheduler.__main__ import build_authenticator

    with pytest.raises(SystemExit) as exit_:
        build_authenticator(settings.load(SchedulerSettings, argv))
    assert message in str(exit_.value.code)


def test_the_scheduler_takes_a_hashed_keys_file_and_flagged_dev_keys(tmp_path) -> None:
    import asyncio

    from tunemesh_common.service import api_keys as api_keys_mod
    from tunemesh_scheduler.__main__ import build_authenticator

    key, record = api_keys_mod.new_key("acme")
    api_keys_mod.write_key_file(tmp_path / "keys.json", [record])
    auth = build_authenticator(settings.load(SchedulerSettings, [
        "--api-keys-file", str(tmp_path / "keys.json"), "--insecure-dev-keys", "true", "--api-keys", "dev=bob",
        "--auth-max-failures", "3"]))
    assert asyncio.run(auth({"authorization": f"Bearer {key}"})) == "acme"
    assert asyncio.run(auth({"x-api-key": "dev"})) == "bob"
    assert auth.throttle.max_failures == 3
    (tmp_path / "plain.json").write_text('{"k": "acme"}')
    with pytest.raises(SystemExit, match="plain-text keys"):
        build_authenticator(settings.load(SchedulerSettings, ["--api-keys-file", str(tmp_path / "plain.json")]))
