"""FilesystemCallStore: round trips, replacement, atomic puts (an interrupted put, a put
SIGKILLed mid-write), key validation, deletion through a seq_id or of a whole run."""

from __future__ import annotations

import itertools
import os
import pathlib
import selectors
import signal
import subprocess
import sys
import textwrap

import pytest
from tunemesh_checkpoint.call_store import FilesystemCallStore
from tunemesh.errors import InvalidArgumentError, NotFoundError

SERVICES = pathlib.Path(__file__).resolve().parents[3] / "services"
RUN = "runs/3f2a-41"


@pytest.fixture
def calls(tmp_path: pathlib.Path) -> FilesystemCallStore:
    return FilesystemCallStore(tmp_path / "calls", fsync=False)


def read(calls: FilesystemCallStore, run: str, seq_id: int, chunk_size: int = 1 << 20) -> bytes:
    return b"".join(calls.read(run, seq_id, chunk_size))


def files_under(root: pathlib.Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_a_call_round_trips_in_chunks_under_its_run_and_seq_id(calls):
    data = os.urandom(3 * 65536 + 17)
    assert calls.put(RUN, 7, [data[:1000], data[1000:]]) == len(data)
    assert read(calls, RUN, 7, chunk_size=65536) == data
    assert [len(c) for c in calls.read(RUN, 7, 65536)] == [65536, 65536, 65536, 17]
    assert files_under(calls.root) == [f"3f2a-41/{7:020d}"]


def test_a_put_replaces_the_call_kept_under_its_key(calls):
    calls.put(RUN, 1, [b"first"])
    calls.put(RUN, 1, [b"second, longer"])
    assert read(calls, RUN, 1) == b"second, longer"
    assert files_under(calls.root) == [f"3f2a-41/{1:020d}"]


def test_an_unknown_call_is_not_found(calls):
    calls.put(RUN, 1, [b"x"])
    for run, seq_id in ((RUN, 2), ("runs/other", 1)):
        with pytest.raises(NotFoundError) as info:
            calls.read(run, seq_id)
        assert info.value.reason == "CALL_NOT_FOUND"


def test_a_put_whose_chunks_fail_changes_nothing(calls):
    calls.put(RUN, 1, [b"kept"])

    def failing():
        yield b"half of a new call"
        raise OSError("client went away")

    with pytest.raises(OSError):
        calls.put(RUN, 1, failing())
    with pytest.raises(OSError):
        calls.put(RUN, 2, failing())
    assert read(calls, RUN, 1) == b"kept"
    with pytest.raises(NotFoundError):
        calls.read(RUN, 2)
    assert files_under(calls.root) == [f"3f2a-41/{1:020d}"]  # no temporary file left


_CHILD = textwrap.dedent("""
    import itertools, pathlib, sys, time
    from tunemesh_checkpoint.call_store import FilesystemCallStore

    def endless():
        for i in itertools.count():
            if i == 64:
                print("WRITING", flush=True)
            yield bytes([i % 256]) * 4096
            if i >= 64:
                time.sleep(0.001)

    FilesystemCallStore(pathlib.Path(sys.argv[1])).put(sys.argv[2], 1, endless())
""")


def test_a_put_killed_mid_write_leaves_the_old_call_and_recover_cleans_up(tmp_path):
    root = tmp_path / "calls"
    FilesystemCallStore(root).put(RUN, 1, [b"the call before"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SERVICES / "checkpoint"), str(SERVICES / "common")])}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(root), RUN], stdout=subprocess.PIPE, env=env)
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        if not selector.select(10.0):
            child.kill()
            pytest.fail("the child never started writing")
    assert child.stdout.readline().strip() == b"WRITING"
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=5) == -signal.SIGKILL
    child.stdout.close()

    calls = FilesystemCallStore(root)
    assert read(calls, RUN, 1) == b"the call before"
    assert len(files_under(root)) == 2  # the call and the killed put's temporary file
    assert calls.recover() == 1
    assert files_under(root) == [f"3f2a-41/{1:020d}"]
    assert read(calls, RUN, 1) == b"the call before"


@pytest.mark.parametrize("run", [
    "3f2a", "runs/", "runs/..", "runs/../x", "runs/a/b", "runs/.hidden", "runs/a b", "runs/a%2F..", "runs/" + "a" * 129,
    "checkpoints/a", "", None,
])
def test_a_run_name_that_is_not_one_safe_segment_is_refused(calls, run):
    for attempt in (lambda: calls.put(run, 1, [b"x"]), lambda: calls.read(run, 1),
                    lambda: calls.delete(run), lambda: calls.delete(run, 3)):
        with pytest.raises(InvalidArgumentError) as info:
            attempt()
        assert info.value.reason == "BAD_CALL_KEY"
    assert files_under(calls.root) == []


@pytest.mark.parametrize("seq_id", [0, -1, 10**20, 1.0, "1", True])
def test_a_seq_id_out_of_range_is_refused(calls, seq_id):
    for attempt in (lambda: calls.put(RUN, seq_id, [b"x"]), lambda: calls.read(RUN, seq_id),
                    lambda: calls.delete(RUN, seq_id)):
        with pytest.raises(InvalidArgumentError) as info:
            attempt()
        assert info.value.reason == "BAD_CALL_KEY"
    assert files_under(calls.root) == []


def test_delete_through_a_seq_id_keeps_the_later_calls_and_other_runs(calls):
    for run, seq_id in itertools.product((RUN, "runs/3f2a-4", "runs/3f2a-41x"), (1, 2, 9, 10, 11)):
        calls.put(run, seq_id, [f"{run}:{seq_id}".encode()])
    assert calls.delete(RUN, 10) == 4
    assert calls.delete(RUN, 10) == 0  # nothing left to delete is no error
    for seq_id in (1, 2, 9, 10):
        with pytest.raises(NotFoundError):
            calls.read(RUN, seq_id)
    assert read(calls, RUN, 11) == f"{RUN}:11".encode()
    for run in ("runs/3f2a-4", "runs/3f2a-41x"):
        assert [read(calls, run, s) for s in (1, 2, 9, 10, 11)] == [f"{run}:{s}".encode() for s in (1, 2, 9, 10, 11)]


def test_delete_all_removes_the_run_and_a_later_put_starts_it_again(calls):
    for seq_id in (3, 4):
        calls.put(RUN, seq_id, [b"x"])
    calls.put("runs/other", 1, [b"y"])
    assert calls.delete(RUN) == 2
    assert not (calls.root / "3f2a-41").exists()
    assert calls.delete(RUN) == 0
    assert calls.delete("runs/never-kept", 5) == 0
    calls.put(RUN, 5, [b"z"])
    assert read(calls, RUN, 5) == b"z"
    assert files_under(calls.root) == [f"3f2a-41/{5:020d}", f"other/{1:020d}"]


def test_delete_leaves_an_unfinished_put_alone(calls):
    calls.put(RUN, 1, [b"x"])
    leftover = calls.root / "3f2a-41" / f"{2:020d}.tmp-0123456789abcdef"
    leftover.write_bytes(b"half")
    assert calls.delete(RUN) == 1
    assert leftover.exists()  # the run's directory stays for it
    assert calls.recover() == 1
    assert files_under(calls.root) == []
