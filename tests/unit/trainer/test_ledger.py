"""Ledger: fencing by epoch and exactly-once application by seq_id, without a server."""

from __future__ import annotations

import asyncio

import pytest

from tunemesh.errors import Code, FailedPreconditionError, NotFoundError
from tunemesh_trainer.ledger import RECENT, Ledger


def _run(body):
    """Run `body(ledger)` on a fresh event loop (admit makes futures on the running loop)."""

    async def main():
        ledger = Ledger()
        ledger.open("runs/a", 1)
        return await body(ledger)

    return asyncio.run(main())


def _reason(info: pytest.ExceptionInfo) -> tuple[Code, str]:
    return info.value.rpc_code, info.value.reason


def test_a_fresh_seq_id_is_admitted_and_taken():
    async def body(ledger):
        assert ledger.admit("runs/a", 1, 1) is None
        assert ledger.summary() == {"runs/a": (1, 1)}
        assert ledger.admit("runs/a", 2, 1) is None
        assert ledger.summary() == {"runs/a": (1, 2)}

    _run(body)


def test_a_repeat_gets_the_first_outcome_once_recorded():
    async def body(ledger):
        assert ledger.admit("runs/a", 1, 1) is None
        ledger.record("runs/a", 1, "first")
        repeat = ledger.admit("runs/a", 1, 1)
        assert repeat is not None and repeat.done()
        assert await repeat == "first"
        ledger.record("runs/a", 1, "second")  # a later record changes nothing
        assert await ledger.admit("runs/a", 1, 1) == "first"
        assert ledger.summary() == {"runs/a": (1, 1)}

    _run(body)


def test_a_repeat_waiting_before_the_record_gets_it_after():
    async def body(ledger):
        assert ledger.admit("runs/a", 5, 1) is None
        repeat = ledger.admit("runs/a", 5, 1)
        waiter = asyncio.ensure_future(repeat)
        await asyncio.sleep(0)
        assert not waiter.done()
        ledger.record("runs/a", 5, {"loss": 1.5})
        assert await asyncio.wait_for(waiter, 5) == {"loss": 1.5}

    _run(body)


def test_seq_id_zero_is_untracked():
    async def body(ledger):
        for _ in range(3):
            assert ledger.admit("runs/a", 0, 1) is None
            ledger.record("runs/a", 0, "ignored")
        assert ledger.summary() == {"runs/a": (1, 0)}
        assert ledger.admit("runs/a", 1, 1) is None  # seq_id 1 is still fresh

    _run(body)


def test_an_unknown_adapter_is_admitted_untracked():
    async def body(ledger):
        assert ledger.admit("runs/zz", 1, 1) is None
        assert ledger.admit("runs/zz", 1, 1) is None  # not remembered: the engine reports it
        ledger.record("runs/zz", 1, "x")
        assert "runs/zz" not in ledger.summary()

    _run(body)


def test_a_stale_epoch_is_refused_and_epoch_zero_is_unfenced():
    async def body(ledger):
        ledger.open("runs/b", 3)
        with pytest.raises(FailedPreconditionError) as info:
            ledger.admit("runs/b", 1, 2)
        assert _reason(info) == (Code.FAILED_PRECONDITION, "STALE_EPOCH")
        with pytest.raises(FailedPreconditionError) as info:
            ledger.admit("runs/b", 0, 2)  # untracked calls are fenced too
        assert _reason(info) == (Code.FAILED_PRECONDITION, "STALE_EPOCH")
        assert ledger.summary()["runs/b"] == (3, 0)  # a refused call takes nothing
        assert ledger.admit("runs/b", 1, 0) is None  # epoch 0: unfenced
        assert ledger.admit("runs/b", 2, 3) is None  # equal epoch
        assert ledger.admit("runs/b", 3, 4) is None  # higher epoch is admitted ...
        assert ledger.summary()["runs/b"] == (3, 3)  # ... without raising the adapter's

    _run(body)


def test_a_stale_epoch_is_refused_even_for_a_repeat():
    async def body(ledger):
        assert ledger.admit("runs/a", 1, 1) is None
        ledger.record("runs/a", 1, "first")
        ledger.adopt("runs/a", 2)
        with pytest.raises(FailedPreconditionError) as info:
            ledger.admit("runs/a", 1, 1)
        assert _reason(info) == (Code.FAILED_PRECONDITION, "STALE_EPOCH")
        assert await ledger.admit("runs/a", 1, 2) == "first"

    _run(body)


def test_adopt_raises_the_epoch_and_refuses_a_lower_one():
    async def body(ledger):
        assert ledger.adopt("runs/a", 1) == 0
        for seq_id in (1, 2, 3):
            assert ledger.admit("runs/a", seq_id, 1) is None
        assert ledger.adopt("runs/a", 4) == 3
        assert ledger.summary() == {"runs/a": (4, 3)}
        with pytest.raises(FailedPreconditionError) as info:
            ledger.adopt("runs/a", 2)
        assert _reason(info) == (Code.FAILED_PRECONDITION, "STALE_EPOCH")
        assert ledger.summary() == {"runs/a": (4, 3)}
        with pytest.raises(FailedPreconditionError):
            ledger.admit("runs/a", 4, 1)  # the old epoch is fenced off now
        assert ledger.adopt("runs/a", 4) == 3  # re-adopting the same epoch is fine

    _run(body)


def test_adopt_of_an_unknown_adapter_is_not_found():
    ledger = Ledger()
    with pytest.raises(NotFoundError) as info:
        ledger.adopt("runs/zz", 1)
    assert _reason(info) == (Code.NOT_FOUND, "ADAPTER_NOT_FOUND")


def test_outcomes_beyond_recent_are_evicted():
    async def body(ledger):
        total = RECENT + 2
        for seq_id in range(1, total + 1):
            assert ledger.admit("runs/a", seq_id, 1) is None
            ledger.record("runs/a", seq_id, f"out-{seq_id}")
        for seq_id in (1, 2):
            with pytest.raises(FailedPreconditionError) as info:
                ledger.admit("runs/a", seq_id, 1)
            assert _reason(info) == (Code.FAILED_PRECONDITION, "SEQ_ID_APPLIED")
        oldest_kept = total - RECENT + 1
        assert await ledger.admit("runs/a", oldest_kept, 1) == f"out-{oldest_kept}"
        assert await ledger.admit("runs/a", total, 1) == f"out-{total}"

    _run(body)


def test_open_of_an_existing_adapter_starts_its_history_over():
    async def body(ledger):
        for seq_id in (1, 2):
            assert ledger.admit("runs/a", seq_id, 1) is None
            ledger.record("runs/a", seq_id, f"old-{seq_id}")
        ledger.adopt("runs/a", 5)
        ledger.open("runs/a", 2)
        assert ledger.summary() == {"runs/a": (2, 0)}
        assert ledger.admit("runs/a", 1, 2) is None  # applied again: a new adapter
        ledger.record("runs/a", 1, "new-1")
        assert await ledger.admit("runs/a", 1, 2) == "new-1"

    _run(body)


def test_close_forgets_the_adapter():
    async def body(ledger):
        assert ledger.admit("runs/a", 1, 1) is None
        ledger.close("runs/a")
        ledger.close("runs/a")  # twice is fine
        assert ledger.summary() == {}
        assert ledger.admit("runs/a", 1, 1) is None
        with pytest.raises(NotFoundError):
            ledger.adopt("runs/a", 1)

    _run(body)


def test_summary_lists_every_adapter_with_epoch_and_applied_seq_id():
    async def body(ledger):
        ledger.open("runs/b", 0)
        ledger.open("runs/c", 7)
        assert ledger.admit("runs/a", 4, 1) is None
        assert ledger.admit("runs/c", 2, 7) is None
        assert ledger.admit("runs/c", 2, 7) is not None  # a repeat takes nothing new
        assert ledger.summary() == {"runs/a": (1, 4), "runs/b": (0, 0), "runs/c": (7, 2)}

    _run(body)


def test_a_skipped_lower_seq_id_counts_as_applied_long_ago():
    """The ledger keeps the highest seq_id only: one below it that never came is refused
    as if its outcome had been evicted (calls of a run must arrive in seq_id order)."""

    async def body(ledger):
        assert ledger.admit("runs/a", 3, 1) is None
        with pytest.raises(FailedPreconditionError) as info:
            ledger.admit("runs/a", 2, 1)
        assert _reason(info) == (Code.FAILED_PRECONDITION, "SEQ_ID_APPLIED")
        assert ledger.summary() == {"runs/a": (1, 3)}

    _run(body)
