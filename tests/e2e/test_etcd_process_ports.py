"""EtcdProcess's first start survives a picked port taken by another process before etcd
bound it (it picks fresh ports); once up, a restart keeps its ports."""

from __future__ import annotations

import shutil
import socket

import pytest

from tunemesh_common.membership.etcd_process import EtcdProcess

pytestmark = pytest.mark.e2e


def test_a_taken_port_on_the_first_start_gives_fresh_ports_and_restarts_keep_them(tmp_path):
    if shutil.which("etcd") is None:
        pytest.skip("etcd binary not installed (Debian: etcd-server)")
    etcd = EtcdProcess(tmp_path / "data", log_path=tmp_path / "etcd.log")
    taken = etcd.client_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            etcd.start()
            assert etcd.client_port != taken and "address already in use" in (tmp_path / "etcd.log").read_text()
            port = etcd.client_port
            etcd.kill()
            etcd.start()
            assert etcd.client_port == port
        finally:
            etcd.stop()
