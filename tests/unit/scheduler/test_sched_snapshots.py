"""The snapshot book alone: when a run's snapshot is due while others are being written."""

from tunemesh_scheduler.core.records import OperationRecord, OpKind, RunRecord
from tunemesh_scheduler.core.snapshots import SnapshotBook, SnapshotPolicy


def _run() -> RunRecord:
    return RunRecord(name="runs/a", tenant="t1", session="s", base_model="m", lora=None, node_id="n", create_time=0.0)


def _optim(seq_id: int) -> OperationRecord:
    return OperationRecord(name=f"op{seq_id}", tenant="t1", run="runs/a", seq_id=seq_id, kind=OpKind.OPTIM_STEP,
                           request_id="", payload_digest=b"", num_tokens=0, node_id="n", create_time=0.0)


def _asked(book: SnapshotBook, run: RunRecord, seq_id: int, now: float) -> bool:
    op = _optim(seq_id)
    book.mark(run, op, now)
    return bool(op.snapshot_path)


def test_work_counts_from_the_latest_snapshot_once_an_earlier_one_is_written():
    """Budget 3 s, 2 s rounds, each step's snapshot asked for while the last is out: once
    the first is written, what the second covers is counted from it, so the next step
    (2 s since the second's round, plus one more) is due again."""
    book, run, now = SnapshotBook(SnapshotPolicy(every_steps=0, every_s=0, replay_budget_s=3.0)), _run(), 0.0

    def round_of(seconds: float) -> None:
        nonlocal now
        now += seconds
        book.worked([run], seconds, now)

    round_of(2)
    assert _asked(book, run, 2, now)  # 2 + 2 > 3
    round_of(2)  # the round of seq_id 2's own step: covered by its snapshot
    run.step = 1
    assert not _asked(book, run, 4, now)  # 0 since the snapshot of seq_id 2 (+2) is within 3
    round_of(2)
    run.step = 2
    assert _asked(book, run, 6, now)  # 2 + 2 > 3: asked while the one of seq_id 2 is out
    round_of(2)
    run.step = 3
    book.written(run, 2, now)
    round_of(2)
    run.step = 4
    assert _asked(book, run, 10, now)  # 2 s since seq_id 6's round, plus one more: due
    assert not _asked(book, run, 12, now)  # two out already
    round_of(2)
    book.failed(run, 10)  # the one of seq_id 6 covers 4 s less than the 8 s done
    assert _asked(book, run, 12, now)
