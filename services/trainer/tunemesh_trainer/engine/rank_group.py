"""A trainer as a process group of W ranks: rank 0 drives its engine calls, the others follow.

Rank 0 broadcasts every engine call (engine key, a `RankCall`, pickled arguments) over a
gloo control group; every rank runs it on its own DeepSpeedTrainingEngine; rank 0 then
gathers a fingerprint of each rank's result (its error, digests, item failures, metrics)
and refuses to go on if the ranks disagree. Followers run `serve_rank` until told to close.
Every collective is bounded by the group's timeout, the followers' wait for the next call
included: an idle rank 0 therefore broadcasts a KEEPALIVE (nothing to run, nothing
gathered) well within it, or an idle trainer would lose its ranks (`keep_alive`, called
periodically by `tunemesh_trainer.ranks`).

This is the per-rank side only: forming the group (launchers, local worker processes,
their watchdog) is `tunemesh_trainer.ranks`.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from tunemesh.errors import InternalError
from tunemesh_trainer.domain import AdamSpec, AdapterState, EngineItem, ItemOutcome, LoraSpec

logger = logging.getLogger(__name__)


class RankCall(enum.Enum):
    """What rank 0 asks every rank to do: build, drop or call an engine, or leave."""

    BUILD = "build"  # a DeepSpeedTrainingEngine(**kwargs) under the key
    DROP = "drop"  # forget the key's engine
    CLOSE = "close"  # leave `serve_rank`
    KEEPALIVE = "keepalive"  # nothing: rank 0 is idle but alive
    CREATE_ADAPTER = "create_adapter"
    DELETE_ADAPTER = "delete_adapter"
    ADAPTER_IDS = "adapter_ids"
    RUN_BATCH = "run_batch"
    OPTIM_STEP = "optim_step"
    EXPORT_ADAPTER = "export_adapter"
    IMPORT_ADAPTER = "import_adapter"
    ADAPTER_DIGEST = "adapter_digest"


# The engine method behind each engine call (TrainingEngine's methods).
_ENGINE_CALLS: dict[RankCall, Callable[..., Any]] = {
    RankCall.CREATE_ADAPTER: lambda engine, adapter_id, spec: engine.create_adapter(adapter_id, spec),
    RankCall.DELETE_ADAPTER: lambda engine, adapter_id: engine.delete_adapter(adapter_id),
    RankCall.ADAPTER_IDS: lambda engine: engine.adapter_ids(),
    RankCall.RUN_BATCH: lambda engine, items: engine.run_batch(items),
    RankCall.OPTIM_STEP: lambda engine, adapter_id, adam: engine.optim_step(adapter_id, adam),
    RankCall.EXPORT_ADAPTER: lambda engine, adapter_id, with_optimizer: engine.export_adapter(adapter_id, with_optimizer),
    RankCall.IMPORT_ADAPTER: lambda engine, adapter_id, state: engine.import_adapter(adapter_id, state),
    RankCall.ADAPTER_DIGEST: lambda engine, adapter_id: engine.adapter_digest(adapter_id),
}


class RankGroup:
    """Rank 0's handle on the group: builds engines on every rank and forwards calls."""

    def __init__(self, control: Any) -> None:
        import torch.distributed as dist

        self._dist = dist
        self._control = control
        self._engines: dict[int, Any] = {}
        self._keys = itertools.count()
        self._diverged = ""
        self._calls = threading.Lock()  # one call at a time: the ranks follow one message stream
        self._sent = 0  # messages broadcast so far
        self._closed = False

    @property
    def world(self) -> int:
        return self._dist.get_world_size()

    def build(self, **kwargs: Any) -> GroupEngine:
        """A DeepSpeedTrainingEngine(**kwargs) on every rank, driven through the returned engine."""
        key = next(self._keys)
        self.call(key, RankCall.BUILD, (kwargs,))
        return GroupEngine(self, key, self._engines[key].info)

    def call(self, key: int, method: RankCall, args: tuple) -> Any:
        """Run `method(*args)` on engine `key` of every rank; rank 0's result or error.
        Calls from several threads (the trainer core runs engine calls in worker threads)
        take turns."""
        with self._calls:
            return self._call_locked(key, method, args)

    def _call_locked(self, key: int, method: RankCall, args: tuple) -> Any:
        if self._diverged:
            raise InternalError("RANKS_DIVERGED", self._diverged)
        self._send(key, method, args)
        result, error = apply_call(self._engines, key, method, args)
        prints: list = [None] * self.world
        self._dist.gather_object(fingerprint(method, result, error), prints, dst=0, group=self._control)
        if any(p != prints[0] for p in prints[1:]):
            self._diverged = f"ranks disagree after {method.value}: {prints}"
            logger.error("%s", self._diverged)
            raise InternalError("RANKS_DIVERGED", self._diverged)
        if error is not None:
            raise error
        return result

    def _send(self, key: int | None, method: RankCall, args: tuple) -> None:
        """Broadcast one message to the followers (the caller holds `_calls`)."""
        self._dist.broadcast_object_list([(key, method, args)], src=0, group=self._control)
        self._sent += 1

    def keep_alive(self, seen: int) -> int | None:
        """Broadcast a KEEPALIVE unless a message went out since the caller saw `seen`
        messages sent; returns the count to pass next time, None once the group is closed
        or unusable (the caller stops then)."""
        with self._calls:
            if self._closed or self._diverged:
                return None
            if self._sent == seen:
                try:
                    self._send(None, RankCall.KEEPALIVE, ())
                except Exception as err:  # a lost rank: the next call (and the watchdog) report it
                    logger.warning("keepalive to the ranks failed: %r", err)
                    return None
            return self._sent

    def close(self) -> None:
        """Release the workers (they leave `serve_rank`) and the process group."""
        with self._calls:
            self._closed = True
            self._send(None, RankCall.CLOSE, ())
        self._engines.clear()
        self._dist.destroy_process_group()


def serve_rank(control: Any) -> None:
    """A worker's loop: run each call rank 0 broadcasts, report its fingerprint, until close."""
    import torch.distributed as dist

    engines: dict[int, Any] = {}
    while True:
        message: list = [None]
        dist.broadcast_object_list(message, src=0, group=control)
        key, method, args = message[0]
        if method is RankCall.CLOSE:
            break
        if method is RankCall.KEEPALIVE:
            continue
        result, error = apply_call(engines, key, method, args)
        if error is not None and not hasattr(error, "reason"):
            logger.error("rank %d: %s failed: %r", dist.get_rank(), method.value, error)
        dist.gather_object(fingerprint(method, result, error), None, dst=0, group=control)
    dist.destroy_process_group()


def apply_call(engines: dict[int, Any], key: int, method: RankCall, args: tuple) -> tuple[Any, Exception | None]:
    """Run one call on this rank: (result, None) or (None, the exception)."""
    from tunemesh_trainer.engine.deepspeed_engine import DeepSpeedTrainingEngine

    try:
        if method is RankCall.BUILD:
            engines[key] = DeepSpeedTrainingEngine(**args[0])
            return None, None
        if method is RankCall.DROP:
            engines.pop(key, None)
            return None, None
        return _ENGINE_CALLS[method](engines[key], *args), None
    except Exception as err:  # reported to rank 0, which raises its own
        return None, err


def fingerprint(method: RankCall, result: Any, error: Exception | None) -> Any:
    """What every rank must agree on after a call (small: no tensors, no outputs)."""
    if error is not None:
        return ("error", type(error).__name__, getattr(error, "reason", ""))
    if method is RankCall.RUN_BATCH:
        return [(o.item_id, o.failure and o.failure.reason, sorted(o.metrics.items())) for o in result]
    if method is RankCall.EXPORT_ADAPTER:
        return None
    return result


class GroupEngine:
    """The TrainingEngine rank 0 serves: each call runs on every rank's engine."""

    def __init__(self, group: RankGroup, key: int, info: Any) -> None:
        self._group = group
        self._key = key
        self.info = info

    def _call(self, method: RankCall, *args: Any) -> Any:
        return self._group.call(self._key, method, args)

    def create_adapter(self, adapter_id: str, spec: LoraSpec) -> int:
        return self._call(RankCall.CREATE_ADAPTER, adapter_id, spec)

    def delete_adapter(self, adapter_id: str) -> None:
        self._call(RankCall.DELETE_ADAPTER, adapter_id)

    def adapter_ids(self) -> list[str]:
        return self._call(RankCall.ADAPTER_IDS)

    def run_batch(self, items: Sequence[EngineItem]) -> list[ItemOutcome]:
        return self._call(RankCall.RUN_BATCH, list(items))

    def optim_step(self, adapter_id: str, adam: AdamSpec) -> dict[str, float]:
        return self._call(RankCall.OPTIM_STEP, adapter_id, adam)

    def export_adapter(self, adapter_id: str, with_optimizer: bool) -> AdapterState:
        return self._call(RankCall.EXPORT_ADAPTER, adapter_id, with_optimizer)

    def import_adapter(self, adapter_id: str, state: AdapterState) -> int:
        return self._call(RankCall.IMPORT_ADAPTER, adapter_id, state)

    def adapter_digest(self, adapter_id: str) -> str:
        """The digest, checked equal on every rank (weights, AdamW state, gradients)."""
        return self._call(RankCall.ADAPTER_DIGEST, adapter_id)

    def close(self) -> None:
        """Drop this engine on every rank."""
        self._call(RankCall.DROP)
