"""Real traffic through a mesh, and waiting for its Prometheus to have scraped it (the
`observed_mesh` fixture: metrics and dashboard tests query what this leaves behind)."""

from __future__ import annotations

import dataclasses
import time

import tunemesh
from tunemesh_local import prometheus
from tunemesh_local.state import MeshState

STEPS = 3
ROUNDS = 2  # the traffic twice, scraped in between: rates and quantiles then see increases
PROMPT = [5, 6, 7, 8]
ANSWER = [60, 61, 62, 63]
MODEL = "tunemesh/tiny-dense"
# What each round does last: once these count a round, everything before it was recorded.
# Counters that go up last in a round, with how much per round: bob's run is deleted and
# alice's freezes when her session ends.
LAST_COUNTERS = (('sum(tunemesh_rpc_handled_total{grpc_code="NOT_FOUND"})', 1),
                 ("sum(tunemesh_trainer_adapters_unloaded_total)", 2))


@dataclasses.dataclass(frozen=True)
class ObservedMesh:
    mesh: MeshState
    prometheus_url: str
    steps: int  # training steps each tenant ran per round
    rounds: int  # times `drive` ran


def _datum() -> tunemesh.Datum:
    tokens = PROMPT + ANSWER
    return tunemesh.Datum(tunemesh.ModelInput.from_ints(tokens[:-1]), {
        "target_tokens": tokens[1:], "weights": [0.0] * (len(PROMPT) - 1) + [1.0] * len(ANSWER)})


def drive(address: str) -> None:
    """alice and bob each train `STEPS` steps (fused together); alice runs a forward, saves
    weights, samples and scores them; bob asks for a checkpoint that does not exist
    (NOT_FOUND) and deletes his run."""
    with tunemesh.ServiceClient(address, "tml-demo-alice") as alice, \
            tunemesh.ServiceClient(address, "tml-demo-bob") as bob:
        runs = [client.create_lora_training_client(MODEL, rank=4, seed=seed) for seed, client in enumerate((alice, bob))]
        steps = []
        for _ in range(STEPS):
            for run in runs:  # submitted without waiting: both tenants' steps share fused batches
                run.forward_backward([_datum()], "cross_entropy")
                steps.append(run.optim_step(tunemesh.AdamParams(learning_rate=1e-3)))
        for step in steps:
            step.result(timeout=120)
        runs[0].forward([_datum()], "cross_entropy").result(timeout=120)
        sampler = runs[0].save_weights_and_get_sampling_client("observed")
        params = tunemesh.SamplingParams(max_tokens=len(ANSWER), temperature=0.0)
        sampler.sample(tunemesh.ModelInput.from_ints(PROMPT), 2, params).result(timeout=120)
        sampler.compute_logprobs(tunemesh.ModelInput.from_ints(PROMPT + ANSWER)).result(timeout=120)
        try:
            bob.create_checkpoint_client().get(f"tunemesh://runs/{runs[1].run.removeprefix('runs/')}/sampler/none")
        except tunemesh.NotFoundError:
            pass
        else:
            raise AssertionError("a missing checkpoint was found")
        runs[1].delete()


def wait_for_scrapes(url: str, rounds: int, timeout: float = 30.0) -> None:
    """Until Prometheus has seen `rounds` rounds of traffic and then scraped every target
    twice more (TimeoutError otherwise)."""
    deadline = time.monotonic() + timeout
    for counter, per_round in LAST_COUNTERS:
        _wait(url, f"{counter} >= {per_round * rounds}", deadline)
    seen = max(float(r["value"][1]) for r in prometheus.query(url, "timestamp(up)"))
    _wait(url, f"min(timestamp(up)) >= {seen + 1.5}", deadline)  # 1 s scrapes: two more of each target


def _wait(url: str, promql: str, deadline: float) -> None:
    while not prometheus.query(url, promql):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Prometheus at {url}: no result for {promql!r} in time")
        time.sleep(0.2)
