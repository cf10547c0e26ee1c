"""Sessions that end or expire freeze their idle runs (adapter slot released, placement
released); ResumeTrainingRun attaches a run to an open session and rebuilds a frozen one
from its snapshot and kept calls. Fake clock, fake ports, in-memory store."""

from __future__ import annotations

import asyncio

import pytest
from scheduler_fakes import FakePlacement, FakeTrainer, settle

from tunemesh.errors import FailedPreconditionError
from tunemesh_scheduler.core import ItemOutcome, OperationError, OpKind, SchedulerConfig, SchedulerCore
from tunemesh_scheduler.core.store import MemoryRunStore


async def _core(now: list[float], **config) -> SchedulerCore:
    core = SchedulerCore(FakePlacement(), FakeTrainer(), SchedulerConfig(**config), clock=lambda: now[0],
                         store=MemoryRunStore())
    await core.start()
    return core


async def _trained_run(core: SchedulerCore, session: str, steps: int = 1):
    run = await core.create_run("t1", session, "tiny", {"rank": 8})
    for seq in range(1, 2 * steps + 1):
        kind = OpKind.FORWARD_BACKWARD if seq % 2 else OpKind.OPTIM_STEP
        op = await core.submit("t1", run.name, seq, "", kind, (run.name, seq), repr(seq), 3)
        await core.wait_operation("t1", op.name, 5)
        assert op.done and op.error is None, op
    return run


def test_an_ended_session_freezes_its_idle_runs_and_resume_rebuilds_them() -> None:
    async def scenario() -> None:
        now = [1000.0]
        core = await _core(now)
        session = core.create_session("t1")
        run = await _trained_run(core, session.name, steps=2)
        core.end_session("t1", session.name)
        await settle()
        assert run.node_id == "" and ("node-a", run.name) in core._trainer.deleted
        assert (run.name, "node-a") in core.runs._placement.released
        with pytest.raises(FailedPreconditionError) as err:  # its session is over
            await core.submit("t1", run.name, 5, "", OpKind.FORWARD, ("x",), "x", 1)
        assert err.value.reason == "SESSION_ENDED"
        fresh = core.create_session("t1")
        await core.resume_run("t1", run.name, fresh.name)
        await settle(60)
        assert run.node_id == "node-a" and run.session == fresh.name and run.epoch == 2
        replayed = [b for node, b in core._trainer.batches[-4:]]
        assert [item.fence for batch in replayed for item in batch][-4:] == [
            type(replayed[0][0].fence)(seq, 2) for seq in (1, 2, 3, 4)]  # the whole log, new epoch
        op = await core.submit("t1", run.name, 5, "", OpKind.FORWARD, ("x",), "x", 1)
        await core.wait_operation("t1", op.name, 5)
        assert op.done and op.error is None
        await core.stop()

    asyncio.run(scenario())


def test_a_session_without_heartbeat_expires_and_a_busy_run_freezes_once_idle() -> None:
    async def scenario() -> None:
        now = [1000.0]
        core = await _core(now, session_timeout_s=30)
        session = core.create_session("t1")
        run = await _trained_run(core, session.name)
        core._trainer.hold = asyncio.Event()
        op = await core.submit("t1", run.name, 3, "", OpKind.FORWARD_BACKWARD, ("y",), "y", 3)
        await settle()
        now[0] += 20
        core.heartbeat_session("t1", session.name)
        now[0] += 25
        core.sweep_sessions()
        assert not core.get_session("t1", session.name).ended  # heard from 25 s ago
        now[0] += 10
        core.sweep_sessions()
        assert core.get_session("t1", session.name).ended
        await settle()
        assert run.node_id == "node-a"  # busy: not frozen under its running call
        core._trainer.hold.set()
        await core.wait_operation("t1", op.name, 5)
        core.sweep_sessions()
        await settle()
        assert run.node_id == ""
        await core.stop()

    asyncio.run(scenario())


def test_resume_needs_an_open_session_of_the_tenant() -> None:
    async def scenario() -> None:
        core = await _core([1000.0])
        session = core.create_session("t1")
        run = await _trained_run(core, session.name)
        other = core.create_session("t2")
        with pytest.raises(Exception) as err:
            await core.resume_run("t1", run.name, other.name)
        assert getattr(err.value, "reason", "") == "SESSION_NOT_FOUND"
        with pytest.raises(Exception) as err:
            await core.resume_run("t2", run.name, other.name)
        assert getattr(err.value, "reason", "") == "RUN_NOT_FOUND"
        await core.stop()

    asyncio.run(scenario())


def test_only_calls_a_replay_needs_stay_kept() -> None:
    """A finished call that changed nothing (a forward, a save, a failed call) leaves the
    store; a succeeded forward_backward / optim_step stays until a snapshot covers it."""

    async def scenario() -> None:
        core = await _core([1000.0], snapshot_every_steps=0, snapshot_every_s=0)
        store = core.journal._store
        session = core.create_session("t1")
        run = await core.create_run("t1", session.name, "tiny", {"rank": 8})
        kinds = [OpKind.FORWARD, OpKind.FORWARD_BACKWARD, OpKind.OPTIM_STEP, OpKind.FORWARD_BACKWARD,
                 OpKind.FORWARD_BACKWARD]
        core._trainer.item_errors[(run.name, 5)] = ItemOutcome(error=OperationError(3, "NON_FINITE_LOSS", "nan"))
        for seq, kind in enumerate(kinds, start=1):
            op = await core.submit("t1", run.name, seq, "", kind, (run.name, seq), repr(seq), 3)
            await core.wait_operation("t1", op.name, 5)
        await core.sync()
        assert sorted(seq for (r, seq) in store.kept_payloads if r == run.name) == [2, 3, 4]
        await core.stop()

    asyncio.run(scenario())
