"""Faults that are not deaths: a trainer paused (SIGSTOP) past its lease and then resumed,
and an etcd outage (SIGKILL, restart on the same data). Clients see only latency, the
results equal an untouched twin bit for bit, nothing is applied twice; during the etcd
outage existing runs keep training while creates answer UNAVAILABLE with a reason."""

from __future__ import annotations

import os
import signal
import threading

import grpc
import pytest
from fault_ops import MODEL, kill, process, restart
from mesh_tls import scheduler_channel
from twin_runs import TENANTS, assert_matches_twin, train_pair

from tunemesh.v1 import sessions_pb2, sessions_pb2_grpc, training_pb2, training_pb2_grpc, types_pb2
from tunemesh.errors import error_from_rpc
from tunemesh_local.state import MeshState

pytestmark = pytest.mark.e2e

LEASE_TTL_S = 5  # the trainers' default
LEADER_TTL_S = 5  # the schedulers' default leader lease



def test_trainer_paused_past_its_lease_applies_nothing_twice(fault_mesh: MeshState, twin: list[dict]) -> None:
    paused = []

    def fault(trainees) -> None:
        trainees[0].futures[6].result(timeout=120)
        victim = process(fault_mesh, trainees[0].training.get_info().trainer_node)
        os.kill(victim.pid, signal.SIGSTOP)
        paused.append(victim)
        threading.Event().wait(LEASE_TTL_S + 4)  # its runs move meanwhile
        os.kill(victim.pid, signal.SIGCONT)  # its late answers are refused or ignored

    try:
        faulted = train_pair(fault_mesh.scheduler_address, during=fault)
    finally:
        for victim in paused:
            os.kill(victim.pid, signal.SIGCONT)
    assert_matches_twin(faulted, twin)


@pytest.mark.parametrize("outage_s", [2.0, LEADER_TTL_S + 3.0], ids=["short", "past-the-leader-lease"])
def test_etcd_outage_runs_keep_training_creates_are_retryable(fault_mesh: MeshState, twin: list[dict],
                                                              outage_s: float) -> None:
    """Past the leader's lease the scheduler gives up its leadership with the results of
    the outage unstored: no client has seen them (core/release.py), the new leader
    rebuilds the runs and the clients re-send those calls."""
    refused = []
    session = _open_session(fault_mesh)

    def fault(trainees) -> None:
        trainees[0].futures[4].result(timeout=120)
        kill(fault_mesh, "etcd")
        try:
            refused.append(_create_once(fault_mesh, session))
            threading.Event().wait(outage_s)  # training goes on meanwhile
        finally:
            restart(fault_mesh, "etcd")

    faulted = train_pair(fault_mesh.scheduler_address, during=fault)
    code, reason = refused[0]
    assert code == grpc.StatusCode.UNAVAILABLE, (code, reason)
    assert reason in ("ETCD_UNAVAILABLE", "STORE_UNAVAILABLE")
    assert_matches_twin(faulted, twin, "(etcd outage)")


METADATA = (("authorization", f"Bearer {TENANTS[0]}"),)


def _open_session(mesh: MeshState) -> str:
    with scheduler_channel(mesh) as channel:
        response = sessions_pb2_grpc.SessionServiceStub(channel).CreateSession(
            sessions_pb2.CreateSessionRequest(), metadata=METADATA, timeout=30)
    return response.session.name


def _create_once(mesh: MeshState, session: str) -> tuple[grpc.StatusCode, str]:
    """One CreateTrainingRun with no retry: its status code and REASON."""
    request = training_pb2.CreateTrainingRunRequest(session=session, base_model=MODEL,
                                                    lora_config=types_pb2.LoraConfig(rank=4, train_attn=True))
    with scheduler_channel(mesh) as channel:
        try:
            training_pb2_grpc.TrainingServiceStub(channel).CreateTrainingRun(request, metadata=METADATA, timeout=30)
        except grpc.RpcError as err:
            return err.code(), error_from_rpc(err).reason
    return grpc.StatusCode.OK, ""
