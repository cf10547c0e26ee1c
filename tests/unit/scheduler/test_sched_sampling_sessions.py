"""Creating sampling sessions in the core: what a session samples from, which sampler
serves it, and the errors, with fake checkpoint and sampler ports (no server)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from scheduler_fakes import make_mesh
from tunemesh_common.checkpoints.paths import adapter_key
from tunemesh.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from tunemesh_scheduler.core import DataWork, LoadRequest, OpKind, SaveRequest, StepWork, kind_of


@dataclasses.dataclass
class Checkpoint:
    path: str
    base_model: str


class FakeCheckpoints:
    def __init__(self, **by_tenant: dict[str, Checkpoint]) -> None:
        self.by_tenant = by_tenant
        self.asked: list[tuple[str, str]] = []

    async def get(self, tenant: str, path: str) -> Checkpoint:
        self.asked.append((tenant, path))
        found = self.by_tenant.get(tenant, {}).get(path)
        if found is None:
            raise NotFoundError("CHECKPOINT_NOT_FOUND", path)
        return found


class FakeSamplers:
    def __init__(self, models: tuple[str, ...] = ("tiny",)) -> None:
        self.models = models
        self.routed: list[tuple[str, str]] = []

    def model(self, base_model: str) -> str:
        if base_model not in self.models:
            raise NotFoundError("UNKNOWN_MODEL", base_model)
        return base_model

    def route(self, base_model: str, adapter_key: str = "") -> str:
        self.routed.append((base_model, adapter_key))
        return "sampler-1"


CKPT = "tunemesh://runs/r1/sampler/w1"


def _create(**kwargs):
    async def main():
        mesh = await make_mesh()
        try:
            session = mesh.core.create_session("t1")
            checkpoints = kwargs.pop("checkpoints", FakeCheckpoints(t1={CKPT: Checkpoint(CKPT, "tiny")}))
            samplers = kwargs.pop("samplers", FakeSamplers())
            args = dict(tenant="t1", session=session.name, base_model="", model_path="") | kwargs
            record = await mesh.core.create_sampling_session(
                args["tenant"], args["session"], args["base_model"], args["model_path"],
                checkpoints=checkpoints, samplers=samplers)
            return record, samplers, mesh.core.sampling.get(args["tenant"], record.name)
        finally:
            await mesh.core.stop()
    return asyncio.run(main())


def test_a_base_model_session_has_no_adapter_and_goes_where_the_directory_routes_it():
    record, samplers, stored = _create(base_model="tiny")
    assert (record.base_model, record.model_path, record.adapter_key, record.node_id) == ("tiny", "", "", "sampler-1")
    assert samplers.routed == [("tiny", "")]
    assert stored is record


def test_a_checkpoint_session_takes_the_checkpoint_s_base_model_and_adapter_key():
    record, samplers, _ = _create(model_path=CKPT)
    assert (record.base_model, record.model_path) == ("tiny", CKPT)
    assert record.adapter_key == adapter_key("t1", CKPT) != ""
    assert samplers.routed == [("tiny", record.adapter_key)]


@pytest.mark.parametrize(("kwargs", "error", "reason"), [
    ({}, InvalidArgumentError, "MISSING_MODEL"),
    ({"base_model": "huge"}, NotFoundError, "UNKNOWN_MODEL"),
    ({"model_path": CKPT, "base_model": "other"}, FailedPreconditionError, "WRONG_BASE_MODEL"),
    ({"model_path": "tunemesh://runs/r9/sampler/x"}, NotFoundError, "CHECKPOINT_NOT_FOUND"),
    ({"base_model": "tiny", "session": "sessions/nope"}, NotFoundError, "SESSION_NOT_FOUND"),
])
def test_bad_requests_fail_with_their_reason_and_create_nothing(kwargs, error, reason):
    with pytest.raises(error) as caught:
        _create(**kwargs)
    assert caught.value.reason == reason


def test_another_tenant_s_checkpoint_is_not_found():
    checkpoints = FakeCheckpoints(t2={CKPT: Checkpoint(CKPT, "tiny")})
    with pytest.raises(NotFoundError):
        _create(model_path=CKPT, checkpoints=checkpoints)
    assert checkpoints.asked == [("t1", CKPT)]



def test_a_sampling_session_is_usable_by_its_tenant_while_its_session_is_open():
    async def main():
        mesh = await make_mesh()
        try:
            session = mesh.core.create_session("t1")
            record = await mesh.core.create_sampling_session(
                "t1", session.name, "tiny", "", checkpoints=FakeCheckpoints(), samplers=FakeSamplers())
            assert mesh.core.get_sampling_session("t1", record.name) is record
            with pytest.raises(NotFoundError) as other:
                mesh.core.get_sampling_session("t2", record.name)
            mesh.core.end_session("t1", session.name)
            with pytest.raises(FailedPreconditionError) as ended:
                mesh.core.get_sampling_session("t1", record.name)
            with pytest.raises(NotFoundError) as other_ended:  # still nothing of t1's for t2
                mesh.core.get_sampling_session("t2", record.name)
            return other.value.reason, ended.value.reason, other_ended.value.reason
        finally:
            await mesh.core.stop()
    assert asyncio.run(main()) == ("SAMPLING_SESSION_NOT_FOUND", "SESSION_ENDED", "SAMPLING_SESSION_NOT_FOUND")

def test_every_kind_of_work_names_its_operation_kind():
    assert kind_of(DataWork((), "cross_entropy", {}, backward=False)) is OpKind.FORWARD
    assert kind_of(DataWork((), "cross_entropy", {}, backward=True)) is OpKind.FORWARD_BACKWARD
    assert kind_of(StepWork(adam=None)) is OpKind.OPTIM_STEP
    assert kind_of(SaveRequest("p", include_optimizer_state=True)) is OpKind.SAVE_STATE
    assert kind_of(SaveRequest("p", include_optimizer_state=False)) is OpKind.SAVE_SAMPLER
    assert kind_of(LoadRequest("p", True)) is OpKind.LOAD_STATE
    with pytest.raises(TypeError):
        kind_of(("runs/r1", 3))
