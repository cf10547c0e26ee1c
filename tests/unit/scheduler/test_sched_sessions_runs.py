"""Sessions and runs of the scheduler core: ownership, idempotent creation, listing."""

import asyncio

import pytest
from scheduler_fakes import make_mesh, settle

from tunemesh.errors import (
    AlreadyExistsError,
    Code,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)


def test_sessions_belong_to_their_tenant():
    async def main():
        mesh = await make_mesh()
        core = mesh.core
        session = core.create_session("t1", {"who": "alice"})
        assert session.name.startswith("sessions/") and session.labels == {"who": "alice"}
        assert core.heartbeat_session("t1", session.name) is session
        with pytest.raises(NotFoundError) as info:
            core.get_session("t2", session.name)
        assert info.value.reason == "SESSION_NOT_FOUND"
        with pytest.raises(NotFoundError):
            core.heartbeat_session("t2", session.name)
        core.end_session("t1", session.name)
        with pytest.raises(FailedPreconditionError) as info:
            await core.create_run("t1", session.name, "tiny", {"rank": 8})
        assert info.value.reason == "SESSION_ENDED"
        with pytest.raises(NotFoundError):
            await core.create_run("t1", "sessions/nope", "tiny", {})

    asyncio.run(main())


def test_create_run_places_and_creates_adapter():
    async def main():
        mesh = await make_mesh()
        session = mesh.core.create_session("t1")
        run = await mesh.core.create_run("t1", session.name, "tiny", {"rank": 4})
        assert run.name.startswith("runs/")
        assert (run.tenant, run.session, run.base_model) == ("t1", session.name, "tiny")
        assert run.lora == {"rank": 4} and run.node_id == "node-a"
        assert (run.step, run.last_seq_id, run.create_time) == (0, 0, 1000.0)
        assert mesh.placement.placed == [(run.name, "node-a")]
        assert mesh.trainer.adapters == [("node-a", run.name)]
        assert mesh.core.get_run("t1", run.name) is run
        with pytest.raises(NotFoundError) as info:
            mesh.core.get_run("t2", run.name)
        assert info.value.reason == "RUN_NOT_FOUND"

    asyncio.run(main())


def test_create_run_is_idempotent_by_request_id():
    async def main():
        mesh = await make_mesh()
        session = mesh.core.create_session("t1")
        create = mesh.core.create_run
        first, second = await asyncio.gather(
            create("t1", session.name, "tiny", {"rank": 8}, "req-1"),
            create("t1", session.name, "tiny", {"rank": 8}, "req-1"),
        )
        again = await create("t1", session.name, "tiny", {"rank": 8}, "req-1")
        assert first is second is again
        assert len(mesh.placement.placed) == 1
        with pytest.raises(AlreadyExistsError) as info:
            await create("t1", session.name, "tiny", {"rank": 16}, "req-1")
        assert info.value.reason == "REQUEST_ID_REUSED"
        other = await create("t1", session.name, "tiny", {"rank": 8}, "req-2")
        assert other.name != first.name
        # Another tenant's identical request id is a different request.
        s2 = mesh.core.create_session("t2")
        theirs = await create("t2", s2.name, "tiny", {"rank": 8}, "req-1")
        assert theirs.name not in (first.name, other.name)

    asyncio.run(main())


def test_failed_creation_can_be_retried_with_same_request_id():
    async def main():
        mesh = await make_mesh()
        session = mesh.core.create_session("t1")
        with pytest.raises(NotFoundError) as info:
            await mesh.core.create_run("t1", session.name, "huge", {}, "req")
        assert info.value.reason == "UNKNOWN_MODEL"
        mesh.placement.error = ResourceExhaustedError("NO_CAPACITY", "full")
        with pytest.raises(ResourceExhaustedError):
            await mesh.core.create_run("t1", session.name, "tiny", {}, "req")
        mesh.placement.error = None
        mesh.trainer.adapter_error = UnavailableError("NODE_DOWN", "gone")
        with pytest.raises(UnavailableError):
            await mesh.core.create_run("t1", session.name, "tiny", {}, "req")
        (failed_run, node), = mesh.placement.placed
        assert mesh.placement.released == [(failed_run, node)]
        assert mesh.trainer.deleted == [(node, failed_run)]  # undo, in case the trainer made it anyway
        mesh.trainer.adapter_error = None
        run = await mesh.core.create_run("t1", session.name, "tiny", {}, "req")
        assert mesh.core.list_runs("t1") == ([run], "")

    asyncio.run(main())


def test_list_runs_pages_only_own_runs():
    async def main():
        mesh = await make_mesh()
        mine = [await mesh.new_run("t1") for _ in range(5)]
        theirs = await mesh.new_run("t2")
        page, token = mesh.core.list_runs("t1", page_size=2)
        names = [r.name for r in page]
        while token:
            page, token = mesh.core.list_runs("t1", page_size=2, page_token=token)
            names += [r.name for r in page]
        assert names == mine
        assert [r.name for r in mesh.core.list_runs("t2")[0]] == [theirs]
        assert mesh.core.list_runs("t3") == ([], "")
        with pytest.raises(InvalidArgumentError):
            mesh.core.list_runs("t1", page_token="garbage")

    asyncio.run(main())


def test_not_serving_before_start_and_after_stop():
    async def main():
        mesh = await make_mesh()
        run = await mesh.new_run()
        await mesh.core.stop()
        with pytest.raises(UnavailableError) as info:
            await mesh.submit(run, 1)
        assert info.value.rpc_code == Code.UNAVAILABLE

    asyncio.run(main())


def test_a_tenant_cannot_hold_more_runs_than_its_quota():
    async def main():
        mesh = await make_mesh(max_runs_per_tenant=2)
        session = mesh.core.create_session("t1")
        for _ in range(2):
            await mesh.core.create_run("t1", session.name, "tiny", {}, "")
        with pytest.raises(ResourceExhaustedError) as info:
            await mesh.core.create_run("t1", session.name, "tiny", {}, "")
        assert info.value.reason == "TENANT_RUN_QUOTA"
        other = mesh.core.create_session("t2")  # another tenant is unaffected
        await mesh.core.create_run("t2", other.name, "tiny", {}, "")
        assert len(mesh.placement.placed) == 3

    asyncio.run(main())


def test_concurrent_creates_never_exceed_the_quota():
    """The quota counts creates in flight: 50 creates held inside their awaits (placement,
    then the adapter) still make exactly 16 runs, the other 34 fail at once."""
    async def main():
        mesh = await make_mesh(max_runs_per_tenant=16)
        session = mesh.core.create_session("t1")
        mesh.trainer.adapter_hold = asyncio.Event()
        tasks = [asyncio.create_task(mesh.core.create_run("t1", session.name, "tiny", {}, f"r{i}"))
                 for i in range(50)]
        await settle()
        assert sum(t.done() for t in tasks) == 34  # refused before placing anything
        assert len(mesh.placement.placed) == 16
        mesh.trainer.adapter_hold.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        runs = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, ResourceExhaustedError)]
        assert (len(runs), len(refused)) == (16, 34)
        assert {e.reason for e in refused} == {"TENANT_RUN_QUOTA"}
        assert {e.rpc_code for e in refused} == {Code.RESOURCE_EXHAUSTED}
        assert len(mesh.core.list_runs("t1", page_size=100)[0]) == 16
        other = mesh.core.create_session("t2")  # another tenant's quota is its own
        await mesh.core.create_run("t2", other.name, "tiny", {}, "")

    asyncio.run(main())


def test_a_failed_create_gives_its_quota_slot_back():
    async def main():
        mesh = await make_mesh(max_runs_per_tenant=2)
        session = mesh.core.create_session("t1")
        mesh.trainer.adapter_hold = asyncio.Event()
        tasks = [asyncio.create_task(mesh.core.create_run("t1", session.name, "tiny", {}, "")) for _ in range(3)]
        await settle()
        first_run = mesh.placement.placed[0][0]
        mesh.trainer.adapter_errors[first_run] = UnavailableError("PEER_UNAVAILABLE", "trainer gone")
        with pytest.raises(ResourceExhaustedError):  # both slots are reserved while in flight
            await tasks[2]
        mesh.trainer.adapter_hold.set()
        with pytest.raises(UnavailableError):
            await tasks[0]
        await tasks[1]
        await mesh.core.create_run("t1", session.name, "tiny", {}, "")  # the failed create's slot
        with pytest.raises(ResourceExhaustedError) as info:
            await mesh.core.create_run("t1", session.name, "tiny", {}, "")
        assert info.value.reason == "TENANT_RUN_QUOTA"

    asyncio.run(main())


def test_deleting_an_idle_run_frees_its_slot_and_quota():
    async def main():
        mesh = await make_mesh(max_runs_per_tenant=1)
        session = mesh.core.create_session("t1")
        run = await mesh.core.create_run("t1", session.name, "tiny", {}, "")
        mesh.trainer.hold = asyncio.Event()
        op = await mesh.submit(run.name, 1)
        await settle()
        with pytest.raises(FailedPreconditionError) as busy:
            await mesh.core.delete_run("t1", run.name)
        assert busy.value.reason == "RUN_BUSY"
        with pytest.raises(NotFoundError):  # another tenant cannot even see it
            await mesh.core.delete_run("t2", run.name)
        mesh.trainer.hold.set()
        await mesh.wait_all([op])
        await mesh.core.delete_run("t1", run.name)
        assert mesh.trainer.deleted == [(run.node_id, run.name)]
        assert (run.name, run.node_id) in mesh.placement.released
        with pytest.raises(NotFoundError):
            mesh.core.get_run("t1", run.name)
        with pytest.raises(NotFoundError):
            await mesh.submit(run.name, 2)
        await mesh.core.create_run("t1", session.name, "tiny", {}, "")  # the quota is free again

    asyncio.run(main())


@pytest.mark.parametrize("labels", [
    {f"k{i}": "v" for i in range(33)},
    {"k" * 257: "v"},
    {"k": "v" * 257},
    {"": "v"},
])
def test_session_labels_are_bounded(labels):
    from tunemesh.errors import InvalidArgumentError
    from tunemesh_scheduler.core.sessions import SessionRegistry

    registry = SessionRegistry(lambda: 0.0, lambda: "s1")
    with pytest.raises(InvalidArgumentError) as caught:
        registry.create("t1", labels)
    assert caught.value.reason == "BAD_LABELS" and len(registry) == 0
    assert registry.create("t1", {f"k{i}": "v" * 256 for i in range(32)}).labels["k0"] == "v" * 256


def test_a_run_reports_its_owner_and_when_its_latest_operation_came():
    """GetTrainingRun's owner is the run's tenant; its last request time is the creation time
    until an operation is accepted, then that operation's (Tinker's TrainingRun shows both)."""
    from tunemesh_scheduler import convert

    async def main():
        mesh = await make_mesh()
        run = await mesh.new_run("t1")
        record = mesh.core.get_run("t1", run)
        assert convert.run(record).owner == "t1"
        assert convert.run(record).last_request_time.ToSeconds() == 1000
        mesh.now[0] = 1042.0
        op = await mesh.submit(run, 1)
        mesh.now[0] = 1050.0
        await mesh.wait_all([op])
        assert convert.run(record).last_request_time.ToSeconds() == 1042

    asyncio.run(main())
