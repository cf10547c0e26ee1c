"""bench/snapshot_transfer.py end to end at a small size: both modes write, read nothing
back wrong and leave the service's store and handoff directory empty (no timing checked)."""

from __future__ import annotations

import pytest
from bench_loader import bench_module


@pytest.fixture(scope="module")
def transfer():
    with bench_module("snapshot_transfer") as module:
        yield module


def test_both_modes_are_measured_in_alternation(transfer, tmp_path):
    result = transfer.main(["--mb", "2", "--count", "3", "--repeats", "2", "--json", str(tmp_path / "out.json")])
    assert [s["mode"] for s in result["samples"]] == ["stream", "handoff", "handoff", "stream"]
    for sample in result["samples"]:
        assert sample["mb"] == pytest.approx(6.0, abs=0.1)
        assert sample["cpu_ms_per_mb"] == pytest.approx(sample["service_ms_per_mb"] + sample["client_ms_per_mb"],
                                                        abs=0.01)
    assert set(result["summary"]) == {"stream", "handoff", "cpu_handoff_over_stream", "wall_handoff_over_stream"}
    assert (tmp_path / "out.json").is_file()


def test_a_state_checkpoints_files_add_up_to_its_size(transfer):
    files = transfer.state_files(6)
    sizes = {name: sum(memoryview(p).nbytes for p in parts) for name, parts in files.items()}
    assert sum(sizes.values()) == pytest.approx(6 << 20, rel=0.01)
    assert sizes["optimizer.safetensors"] == 2 * sizes["adapter_model.safetensors"]
