"""The completion log behind WatchOperations: cursors, replay, trimming, epochs."""

from __future__ import annotations

import asyncio

import pytest

from tunemesh_scheduler.core.completions import CompletionFeed, CompletionLog


def test_cursors_count_each_tenants_completions_from_one():
    log: CompletionLog[str] = CompletionLog("e1")
    assert [log.append("a", "op1"), log.append("b", "op2"), log.append("a", "op3")] == [1, 1, 2]
    assert (log.head("a"), log.head("b"), log.head("c")) == (2, 1, 0)


def test_replay_sends_every_completion_after_the_cursor_in_order():
    log: CompletionLog[str] = CompletionLog("e1")
    for name in ("op1", "op2", "op3"):
        log.append("a", name)
    log.append("b", "other-tenant")
    replay = log.replay("a", "e1", 1)
    assert (replay.epoch, replay.cursor, replay.items, replay.cursor_lost) == ("e1", 3, ["op2", "op3"], False)
    assert log.replay("a", "e1", 3).items == [] and log.replay("a", "e1", 0).items == ["op1", "op2", "op3"]


def test_a_new_watch_starts_at_the_head_with_nothing_owed():
    log: CompletionLog[str] = CompletionLog("e1")
    log.append("a", "op1")
    replay = log.replay("a", "", 0)
    assert (replay.cursor, replay.items, replay.cursor_lost) == (1, [], False)


@pytest.mark.parametrize(("epoch", "cursor"), [("e0", 1), ("e1", 9)])  # another epoch; past the head
def test_a_cursor_of_another_epoch_or_past_the_head_is_lost(epoch, cursor):
    log: CompletionLog[str] = CompletionLog("e1")
    log.append("a", "op1")
    replay = log.replay("a", epoch, cursor)
    assert (replay.epoch, replay.cursor, replay.items, replay.cursor_lost) == ("e1", 1, [], True)


def test_the_log_keeps_the_last_capacity_completions_and_older_cursors_are_lost():
    log: CompletionLog[int] = CompletionLog("e1", capacity=3)
    for i in range(1, 6):
        log.append("a", i)  # keeps 3, 4, 5
    assert log.replay("a", "e1", 2).items == [3, 4, 5]  # the cursor just before the oldest kept
    assert log.replay("a", "e1", 4).items == [5]
    lost = log.replay("a", "e1", 1)
    assert lost.cursor_lost and lost.items == [] and lost.cursor == 5


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        CompletionLog("e1", capacity=0)


def test_the_feed_wakes_a_watcher_when_its_tenant_completes_and_times_out_otherwise():
    async def main():
        feed: CompletionFeed[str] = CompletionFeed(CompletionLog("e1"))
        waiting = asyncio.create_task(feed.wait_past("a", 0, timeout_s=60))
        other = asyncio.create_task(feed.wait_past("b", 0, timeout_s=0.01))
        await asyncio.sleep(0)
        assert not waiting.done()
        feed.record("a", "op1")
        await asyncio.wait_for(waiting, 5)  # woken, not timed out
        await other  # nothing for b: returns at its timeout
        await asyncio.wait_for(feed.wait_past("a", 0, timeout_s=60), 5)  # already past: at once
        return feed.log.head("a"), feed.log.head("b")

    assert asyncio.run(main()) == (1, 0)
