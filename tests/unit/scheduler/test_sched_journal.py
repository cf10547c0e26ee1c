"""The journal (ordered, grouped, retried writes to the RunStore) and how the core waits
on it: creates answer UNAVAILABLE while the store is down, training submits do not."""

import asyncio
import itertools

import pytest
from scheduler_fakes import FakePlacement, FakeTrainer, settle

from tunemesh.errors import Code, UnavailableError
from tunemesh_scheduler.core import OpKind, OpState, SchedulerConfig, SchedulerCore, SessionRecord
from tunemesh_scheduler.core.journal import MAX_DEFERRED_PER_RUN, MAX_GROUP, Journal
from tunemesh_scheduler.core.records import OperationRecord
from tunemesh_scheduler.core.ports import StoreWrite
from tunemesh_scheduler.core.store import MemoryRunStore


class RecordingStore(MemoryRunStore):
    """A MemoryRunStore that remembers every apply: (session name, deleted, ended)."""

    def __init__(self) -> None:
        super().__init__()
        self.groups: list[list[tuple[str, bool, bool]]] = []

    async def apply(self, writes):
        await super().apply(writes)
        self.groups.append([(w.record.name, w.delete, getattr(w.record, "ended", False)) for w in writes])

    def names(self) -> list[list[str]]:
        return [[name for name, _, _ in group] for group in self.groups]


def _session(name: str, ended: bool = False) -> SessionRecord:
    return SessionRecord(name=f"sessions/{name}", tenant="t1", labels={}, create_time=1.0,
                         last_heartbeat_time=1.0, ended=ended)


def _no_wait(n: int) -> float:
    return 0.0


def test_a_burst_of_changes_is_written_in_few_applies_in_order():
    async def main():
        store = RecordingStore()
        journal = Journal(store, retry_s=_no_wait)
        journal.start()
        tickets = [journal.note(StoreWrite(_session(f"s{i}"))) for i in range(100)]
        assert tickets == list(range(1, 101)) and journal.latest == 100
        assert await journal.synced(tickets[-1], 1.0)
        assert store.applies == -(-100 // MAX_GROUP) < 100  # every group as full as allowed
        written = [name for group in store.groups for name, _, _ in group]
        assert written == [f"sessions/s{i}" for i in range(100)]
        assert journal.backlog == 0
        await journal.stop()

    asyncio.run(main())


def test_later_changes_of_one_record_win_across_groups():
    async def main():
        store = RecordingStore()
        journal = Journal(store, retry_s=_no_wait)
        journal.start()
        journal.note(StoreWrite(_session("kept")))
        journal.note(StoreWrite(_session("dropped")))
        for i in range(MAX_GROUP - 2):  # fills the first group: the next changes go in another
            journal.note(StoreWrite(_session(f"filler{i}")))
        journal.note(StoreWrite(_session("kept", ended=True)))
        journal.note(StoreWrite(_session("dropped"), delete=True))
        await journal.synced(journal.latest, 1.0)
        assert len(store.groups) == 2
        assert store.groups[1] == [("sessions/kept", False, True), ("sessions/dropped", True, False)]
        state = await store.load()
        names = {s.name: s.ended for s in state.sessions}
        assert names["sessions/kept"] is True and "sessions/dropped" not in names
        await journal.stop()

    asyncio.run(main())


def test_changes_noted_while_a_write_is_in_flight_follow_it():
    async def main():
        store = RecordingStore()
        journal = Journal(store, retry_s=_no_wait)
        journal.start()
        journal.urge(journal.note(StoreWrite(_session("a"))))
        await asyncio.sleep(0)  # the flusher takes "a" (waited on: no lingering)
        journal.note(StoreWrite(_session("b")))
        journal.note(StoreWrite(_session("c")))
        await journal.synced(journal.latest, 1.0)
        assert [[name for name, _, _ in group] for group in store.groups] == [
            ["sessions/a"], ["sessions/b", "sessions/c"]]
        await journal.stop()

    asyncio.run(main())


def test_synced_answers_unavailable_while_the_store_is_down_and_writes_once_it_is_back():
    async def main():
        store = RecordingStore()
        journal = Journal(store, retry_s=_no_wait)
        journal.start()
        store.down = True
        first = journal.note(StoreWrite(_session("a")))
        second = journal.note(StoreWrite(_session("b")))
        await settle()
        with pytest.raises(UnavailableError) as info:
            await journal.synced(first, 0)
        assert (info.value.rpc_code, info.value.reason) == (Code.UNAVAILABLE, "STORE_UNAVAILABLE")
        assert journal.store_up is False and journal.backlog == 2
        assert store.records == {}
        store.down = False
        assert await journal.synced(second, 1.0)
        assert journal.store_up is True and journal.backlog == 0
        assert store.groups == [[("sessions/a", False, False), ("sessions/b", False, False)]]
        await journal.stop()

    asyncio.run(main())


def test_stop_writes_what_is_pending_and_gives_up_while_the_store_is_down():
    async def main():
        store = RecordingStore()
        journal = Journal(store, retry_s=_no_wait)
        journal.start()
        journal.note(StoreWrite(_session("a")))
        await journal.stop()
        assert [s.name for s in (await store.load()).sessions] == ["sessions/a"]

        down = RecordingStore()
        down.down = True
        journal = Journal(down, retry_s=_no_wait)
        journal.start()
        journal.note(StoreWrite(_session("b")))
        await journal.stop(drain_s=0)  # returns: the change is not written
        assert down.records == {} and journal.backlog == 1

    asyncio.run(main())


def test_a_journal_without_a_store_keeps_nothing_and_never_waits():
    async def main():
        journal = Journal(None)
        journal.start()
        assert journal.note(StoreWrite(_session("a"))) == 0
        assert (journal.latest, journal.backlog) == (0, 0)
        assert await journal.synced(journal.latest, 0)
        await journal.stop()

    asyncio.run(main())


# ---- deferrable changes ------------------------------------------------------------------


def _finish(run: str, seq_id: int) -> StoreWrite:
    op = OperationRecord(name=f"operations/{run}-{seq_id}", tenant="t1", run=f"runs/{run}", seq_id=seq_id,
                         kind=OpKind.FORWARD_BACKWARD, request_id="", payload_digest=b"", num_tokens=1,
                         node_id="node-a", create_time=1.0, state=OpState.SUCCEEDED, end_time=2.0)
    return StoreWrite(op, deferrable=True)


def _deferring(store: RecordingStore, defer_s: float = 3600, linger_s: float = 0) -> Journal:
    """A started journal that writes at once what is due (no linger, unless given one)."""
    journal = Journal(store, retry_s=_no_wait, linger_s=linger_s, defer_s=defer_s)
    journal.start()
    return journal


def test_a_deferrable_change_waits_for_the_next_change_and_shares_its_write():
    async def main():
        store = RecordingStore()
        journal = _deferring(store)
        journal.note(_finish("a", 1))
        journal.note(_finish("b", 1))
        await settle()
        assert store.groups == [] and journal.backlog == 2  # nobody waits on them: no write of their own
        journal.note(StoreWrite(_session("s")))
        await journal.synced(journal.latest, 1.0)
        assert store.names() == [["operations/a-1", "operations/b-1", "sessions/s"]]  # one write, in order
        await journal.stop()

    asyncio.run(main())


def test_a_deferrable_change_is_written_after_defer_s_or_once_someone_waits_on_it():
    async def main():
        store = RecordingStore()
        journal = _deferring(store, defer_s=0.001)
        journal.note(_finish("a", 1))
        async with asyncio.timeout(10):
            while journal.backlog:  # the deferral ends by itself
                await asyncio.sleep(0.001)
        assert store.names() == [["operations/a-1"]]
        await journal.stop()

        waited = RecordingStore()
        journal = _deferring(waited)
        ticket = journal.note(_finish("a", 1))
        assert await journal.synced(ticket, 1.0)
        assert waited.names() == [["operations/a-1"]]
        await journal.stop()

    asyncio.run(main())


def test_a_run_never_has_more_than_max_deferred_finishes_waiting():
    async def main():
        store = RecordingStore()
        journal = _deferring(store, linger_s=3600)  # the trainer keeps a run's last 16 outcomes: no lingering either
        for seq_id in range(1, MAX_DEFERRED_PER_RUN + 1):
            journal.note(_finish("a", seq_id))
            journal.note(_finish("b", seq_id))  # another run's count is its own
        await settle()
        assert store.groups == []
        journal.note(_finish("a", MAX_DEFERRED_PER_RUN + 1))
        await settle()
        assert len(store.groups) == 1 and journal.backlog == 0  # everything before it too, in order
        assert store.names()[0][-3:] == [f"operations/a-{MAX_DEFERRED_PER_RUN}", f"operations/b-{MAX_DEFERRED_PER_RUN}",
                                        f"operations/a-{MAX_DEFERRED_PER_RUN + 1}"]
        journal.note(_finish("a", MAX_DEFERRED_PER_RUN + 2))  # counted afresh after the write
        await settle()
        assert len(store.groups) == 1 and journal.backlog == 1
        await journal.stop()

    asyncio.run(main())


# ---- the core through a store outage ----------------------------------------------------


async def _core(store: MemoryRunStore, **config) -> SchedulerCore:
    counter = itertools.count(1)
    core = SchedulerCore(FakePlacement(), FakeTrainer(), SchedulerConfig(**config),
                         clock=lambda: 1000.0, new_id=lambda: f"id{next(counter)}", store=store)
    # No real backoff between retries (SchedulerCore builds its Journal with the default).
    core.journal._retry_s = _no_wait
    await core.start()
    return core


def test_create_run_answers_unavailable_while_the_store_is_down_and_a_retry_gets_the_run():
    async def main():
        store = MemoryRunStore()
        core = await _core(store, store_timeout_s=0)
        session = core.create_session("t1")
        await core.sync(1.0)
        store.down = True
        with pytest.raises(UnavailableError) as info:
            await core.create_run("t1", session.name, "tiny", {"rank": 8}, "req-1")
        assert info.value.reason == "STORE_UNAVAILABLE"
        assert [r.name for r in (await _load_when_up(store)).runs] == []
        store.down = False
        await core.sync(1.0)  # the run created before is written now ...
        (stored,) = (await store.load()).runs
        run = await core.create_run("t1", session.name, "tiny", {"rank": 8}, "req-1")
        assert run.name == stored.name  # ... and the client's retry gets it
        assert len(core.runs) == 1
        await core.stop()

    asyncio.run(main())


def test_submit_is_acknowledged_through_a_store_outage_and_the_log_catches_up():
    async def main():
        store = MemoryRunStore()
        core = await _core(store, submit_store_wait_s=0)
        session = core.create_session("t1")
        run = await core.create_run("t1", session.name, "tiny", {"rank": 8})
        store.down = True
        ops = [await core.submit("t1", run.name, seq, f"r{seq}", OpKind.FORWARD_BACKWARD,
                                 ("call", seq), f"d{seq}", 10) for seq in (1, 2)]
        seen = [await core.wait_operation("t1", op.name, 0.5) for op in ops]
        assert [core.operations.get("t1", op.name).state for op in ops] == [OpState.SUCCEEDED] * 2  # training went on
        assert core.get_run("t1", run.name).last_seq_id == 2
        # ... but no client sees a result whose submission is not stored (core/release.py)
        assert [op.state for op in seen] == [OpState.RUNNING] * 2 and all(op.result is None for op in seen)
        assert core.get_operation("t1", ops[0].name).state is OpState.RUNNING and core.release.held == 2
        assert core.operations.evict_finished(float("inf")) == []  # never forgotten while held
        assert (await _load_when_up(store)).operations == []
        with pytest.raises(UnavailableError):
            await core.sync(0)
        store.down = False
        await core.sync(1.0)
        stored = {op.seq_id: op.state for op in (await store.load()).operations}
        assert stored == {1: OpState.SUCCEEDED, 2: OpState.SUCCEEDED}
        released = [await core.wait_operation("t1", op.name, 0.5) for op in ops]
        assert [op.state for op in released] == [OpState.SUCCEEDED] * 2 and core.release.held == 0
        await core.stop()

    asyncio.run(main())


async def _load_when_up(store: MemoryRunStore):
    """What the store holds right now, read past its `down` flag."""
    down, store.down = store.down, False
    try:
        return await store.load()
    finally:
        store.down = down


# ---- lazy and urgent changes --------------------------------------------------------------


def test_a_change_nobody_waits_on_lingers_for_others_and_goes_once_someone_waits():
    async def main():
        store = RecordingStore()
        journal = Journal(store, retry_s=_no_wait, linger_s=3600)
        journal.start()
        journal.note(StoreWrite(_session("a")))
        journal.note(StoreWrite(_session("b")))
        await settle()
        assert store.groups == [] and journal.backlog == 2  # lingering: nobody waits on them
        ticket = journal.note(StoreWrite(_session("c")))
        assert await journal.synced(ticket, 1.0)  # waited on: written at once, with the others
        assert store.names() == [["sessions/a", "sessions/b", "sessions/c"]]
        journal.urge(journal.note(StoreWrite(_session("d"))))
        await settle()
        assert store.names()[1:] == [["sessions/d"]] and journal.backlog == 0
        await journal.stop()

    asyncio.run(main())


def test_a_change_nobody_waits_on_is_written_once_the_linger_ends():
    async def main():
        store = RecordingStore()
        journal = Journal(store, retry_s=_no_wait, linger_s=0.001)
        journal.start()
        journal.note(StoreWrite(_session("a")))
        async with asyncio.timeout(10):
            while journal.backlog:
                await asyncio.sleep(0.001)
        assert store.names() == [["sessions/a"]]
        await journal.stop()

    asyncio.run(main())


def test_a_submit_acknowledged_when_queued_is_written_once_sent_to_its_trainer():
    async def main():
        store = RecordingStore()
        core = await _core(store, journal_linger_s=3600)
        trainer = core._trainer
        session = core.create_session("t1")
        run = await core.create_run("t1", session.name, "tiny", {"rank": 8})  # a create waits: written
        written = len(store.groups)
        trainer.hold = asyncio.Event()
        queued = await core.submit("t1", run.name, 1, "r1", OpKind.FORWARD_BACKWARD, ("call", 1), "d1", 10,
                                   ack_when_queued=True)
        assert len(store.groups) == written  # acknowledged, not stored
        await settle()  # the driver sends it to the trainer (which holds it): its result will wait for the
        assert [op.seq_id for op in (await store.load()).operations] == [1]  # write, so that goes now
        assert core.operations.get("t1", queued.name).state is OpState.RUNNING
        trainer.hold.set()
        assert (await core.wait_operation("t1", queued.name, 5.0)).state is OpState.SUCCEEDED
        stored = await core.submit("t1", run.name, 2, "r2", OpKind.FORWARD_BACKWARD, ("call", 2), "d2", 10)
        assert stored.seq_id == 2 and 2 in [op.seq_id for op in (await store.load()).operations]  # waited for
        await core.stop()

    asyncio.run(main())
