"""What every service's settings class shares (pydantic-settings): flags (`--max-adapters 8`)
over `TUNEMESH_<SERVICE>_<FIELD>` environment variables over defaults, frozen, validated,
every field documented in `python -m tunemesh_<service> --help`.

A service declares `class TrainerSettings(ServiceSettings)` with its own `model_config`
(`settings_config("trainer")`) and builds it once, in `main`, with `load(TrainerSettings, argv)`;
nothing else reads the environment.
"""

from __future__ import annotations

import pathlib
import re
import sys
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from tunemesh_common.security.tls import MeshTls

S = TypeVar("S", bound="ServiceSettings")


def _host_port(value: str) -> str:
    host, colon, port = value.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535 or any(c.isspace() for c in host):
        raise ValueError("expected host:port (port 0 picks a free one)")
    return value


def check_device(value: str) -> str:
    """`value` if it names a device an engine can use (cpu, cuda, cuda:N, auto), else ValueError."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ValueError("expected cpu, cuda, cuda:N or auto")
    return value


HostPort = Annotated[str, AfterValidator(_host_port)]  # host may be empty, a name, an IPv4 or a [IPv6]
HostPortOrEmpty = Annotated[str, AfterValidator(lambda v: v and _host_port(v))]  # empty: none
Device = Annotated[str, AfterValidator(check_device)]  # a torch device; auto: cuda when available, else cpu


def settings_config(service: str) -> SettingsConfigDict:
    """The `model_config` of service `service`'s settings class."""
    return SettingsConfigDict(
        env_prefix=f"TUNEMESH_{service.upper()}_",
        frozen=True,
        extra="forbid",
        validate_default=True,
        cli_prog_name=f"python -m tunemesh_{service}",
        cli_kebab_case=True,
        cli_implicit_flags=False,  # booleans take a value, as always: --durable false
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_show_env_vars=True,
    )


class ServiceSettings(BaseSettings):
    """Base of the services' settings: paths have `~` expanded; every service serves and
    calls over TLS with the mesh's certificates (`tls.py`), or in plaintext with `--insecure`."""

    tls_ca: pathlib.Path | None = Field(None, description="PEM bundle of the mesh CA: the only CA peers are trusted by")
    tls_cert: pathlib.Path | None = Field(None, description="PEM certificate of this process (from the mesh CA)")
    tls_key: pathlib.Path | None = Field(None, description="PEM private key of --tls-cert")
    insecure: bool = Field(False, description="plaintext on every hop, no peer authentication: development only")

    def mesh_tls(self) -> MeshTls | None:
        """This process's TLS material, or None with --insecure true. Raises SystemExit
        saying what to pass when neither is given, or when the files are unusable."""
        files = (self.tls_ca, self.tls_cert, self.tls_key)
        prog = self.model_config.get("cli_prog_name", "")
        if self.insecure:
            if any(files):
                raise SystemExit(f"{prog}: --insecure true and --tls-* files: choose one")
            return None
        if not all(files):
            raise SystemExit(f"{prog}: no TLS material: pass --tls-ca, --tls-cert and --tls-key (`tunemesh up` "
                             "makes them in its state dir; docs/security.md), or --insecure true for development")
        try:
            return MeshTls.from_files(*files)
        except ValueError as err:
            raise SystemExit(f"{prog}: {err}") from None

    @field_validator("*", mode="after")
    @classmethod
    def _expand_user(cls, value: Any) -> Any:
        return value.expanduser() if isinstance(value, pathlib.Path) else value


class NodeSettings(ServiceSettings):
    """What a trainer's and a sampler's settings share: one base model served on a node
    that registers in etcd and reaches the checkpoint service."""

    model: str = Field("tunemesh/tiny-dense", description="registry name of the base model to serve")
    listen: HostPort = Field("127.0.0.1:0", description="host:port to serve on; port 0 picks a free one")
    etcd: HostPortOrEmpty = Field("", description="host:port of etcd; empty: run without registration (tests)")
    checkpoint: HostPortOrEmpty = Field("", description="host:port of the checkpoint service")
    data_dir: pathlib.Path = Field(pathlib.Path("~/.cache/tunemesh"), description="model cache")
    models_file: pathlib.Path | None = Field(
        None, description='JSON list of extra local models, [{"name": ..., "path": ...[, "family": ...]}]')
    ready_file: pathlib.Path | None = Field(
        None, description='written once serving: {"address", "pid", "node_id", "metrics_url"} (for launchers)')
    metrics_listen: HostPortOrEmpty = Field(
        "127.0.0.1:0", description="host:port of /metrics (port 0 picks one); empty: no metrics endpoint")
    num_threads: int = Field(0, ge=0, description="torch threads; 0: torch's default")
    lease_ttl_s: int = Field(5, ge=1, description="etcd lease time-to-live, in seconds")
    advertise_host: str = Field("127.0.0.1", min_length=1, description="host others use to reach this node")


def load(cls: type[S], argv: list[str] | None = None) -> S:
    """`cls` from the command line `argv` (default: this process's), the environment and
    the defaults. `--help` prints every field and exits; a bad value exits with status 2
    and a message naming the flag and the variable."""
    try:
        return CliApp.run(cls, cli_args=sys.argv[1:] if argv is None else list(argv))
    except ValidationError as err:
        print(describe_errors(cls, err), file=sys.stderr)
        raise SystemExit(2) from None


def describe_errors(cls: type[ServiceSettings], err: ValidationError) -> str:
    """One line per invalid field: `--flag (ENV_VAR): what is wrong (got 'value')`; the
    value of a secret field is not repeated."""
    config = cls.model_config
    prog, prefix = config.get("cli_prog_name") or cls.__name__, config.get("env_prefix", "")
    lines = [f"{prog}: invalid settings"]
    for error in err.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        where = f"--{field.replace('_', '-')} ({prefix}{field.upper()})" if field else cls.__name__
        secret = field in cls.model_fields and cls.model_fields[field].annotation is SecretStr
        shown = "input" in error and not isinstance(error["input"], dict) and not secret
        got = f" (got {error['input']!r})" if shown else ""
        lines.append(f"  {where}: {error['msg']}{got}")
    return "\n".join(lines)
