"""Shared e2e fixtures: a real single-member etcd on free loopback ports."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tunemesh_common.etcd_process import EtcdProcess


@pytest.fixture
def etcd_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    """A started etcd in its own tmp data dir; `.kill()` / `.start()` restart it on the same ports."""
    if shutil.which("etcd") is None:
        pytest.skip("etcd binary not installed (Debian: etcd-server)")
    root = tmp_path_factory.mktemp("etcd")
    etcd = EtcdProcess(root / "data", log_path=root / "etcd.log")
    etcd.start()
    yield etcd
    etcd.stop()


@pytest.fixture
def etcd_endpoint(etcd_process: EtcdProcess) -> str:
    """`127.0.0.1:PORT` of a fresh etcd, stopped after the test."""
    return etcd_process.endpoint
