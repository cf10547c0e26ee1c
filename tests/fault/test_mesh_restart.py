"""A run survives `tunemesh down` + `tunemesh up` with no explicit save: every process
stops (trainers lose their adapters), the mesh starts again on the same state dir, and
the run, resumed by name, goes on from its automatic snapshot and op log exactly as an
untouched twin that never stopped."""

from __future__ import annotations

import pytest
from fault_ops import ENV, MODEL
from twin_runs import ADAM, TENANTS, step_data

import tunemesh

pytestmark = pytest.mark.e2e

BEFORE, AFTER = 5, 3  # optimizer steps before the restart (not a multiple of the snapshot period) and after


def steps(training, indices) -> list[float]:
    losses = []
    for step in indices:
        losses.append(training.forward_backward(step_data(0, step)).result(timeout=120).metrics["loss:sum"])
        training.optim_step(ADAM).result(timeout=120)
    return losses


def test_a_run_survives_down_and_up(start_mesh, tmp_path_factory: pytest.TempPathFactory) -> None:
    state_dir = tmp_path_factory.mktemp("down-up")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in ENV.items():
            patch.setenv(name, value)
        with start_mesh(state_dir, trainers=1, models=(MODEL,)) as mesh:
            with tunemesh.ServiceClient(mesh.scheduler_address, api_key=TENANTS[0]) as client:
                twin = client.create_lora_training_client(MODEL, rank=4, seed=11)
                twin_losses = steps(twin, range(BEFORE + AFTER))
                twin_probe = twin.forward(step_data(0, 99)).result(timeout=120)
                run = client.create_lora_training_client(MODEL, rank=4, seed=11)
                losses = steps(run, range(BEFORE))
                name = run.run
        # the mesh is down: every process stopped; the same state dir starts it again
        with start_mesh(state_dir, trainers=1, models=(MODEL,)) as mesh:
            with tunemesh.ServiceClient(mesh.scheduler_address, api_key=TENANTS[0]) as client:
                resumed = client.resume_training_client(name)
                assert resumed.get_info().step == BEFORE
                losses += steps(resumed, range(BEFORE, BEFORE + AFTER))
                probe = resumed.forward(step_data(0, 99)).result(timeout=120)
                assert resumed.get_info().step == BEFORE + AFTER
    assert losses == twin_losses
    assert [o["logprobs"].to_numpy().tobytes() for o in probe.loss_fn_outputs] == \
        [o["logprobs"].to_numpy().tobytes() for o in twin_probe.loss_fn_outputs]
