"""What every `GatewayStore` must do (MemoryStore here, EtcdStore in tests/e2e against a
real etcd): one suite, two implementations."""

from __future__ import annotations

import asyncio

from tunemesh_gateway.core import SamplerEntry


async def check_store(store) -> None:
    assert await store.run_of("s:train:0") is None and await store.models_of(["runs/r1"]) == {}
    assert await store.put_model("s:train:0", "runs/r1") == "runs/r1"
    assert await store.put_model("s:train:1", "runs/r2") == "runs/r2"
    assert await store.run_of("s:train:0") == "runs/r1"
    assert await store.models_of(["runs/r1", "runs/r2", "runs/r9"]) == {"runs/r1": "s:train:0", "runs/r2": "s:train:1"}
    # a model id names one run for good: a later write for it (another replica's race, a
    # second run labelled alike) returns the run it names and changes nothing
    assert await store.put_model("s:train:0", "runs/r7") == "runs/r1"
    assert await store.run_of("s:train:0") == "runs/r1" and await store.models_of(["runs/r7"]) == {}
    raced = await asyncio.gather(store.put_model("s:train:5", "runs/r5"), store.put_model("s:train:5", "runs/r6"))
    assert raced[0] == raced[1] and raced[0] in ("runs/r5", "runs/r6")

    plain = SamplerEntry("ss0", "m", "", "owner-a")
    assert await store.put_sampler(plain) == plain and await store.sampler("ss0") == plain
    assert await store.sampler("nope") is None and await store.sampler_for_seq("s", 0) is None

    first = SamplerEntry("ss1", "m", "tinker://s:train:0/sampler_weights/a", "owner-a")
    second = SamplerEntry("ss2", "m", "tinker://s:train:0/sampler_weights/a", "owner-a")
    won = await asyncio.gather(store.put_sampler(first, "s", 1), store.put_sampler(second, "s", 1))
    assert won[0] == won[1] and won[0] in (first, second)  # one client counter, one sampling session
    assert await store.sampler_for_seq("s", 1) == won[0]
    assert await store.put_sampler(second, "s", 1) == won[0]  # later claims get the holder
    assert await store.sampler_for_seq("s", 2) is None
