"""Trainer and sampler membership (from etcd watches), run placement (etcd transactions)
and sampling-session routing."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from google.protobuf.message import DecodeError

from tunemesh_internal.v1 import sampler_pb2, trainer_pb2
from tunemesh.v1 import sessions_pb2
from tunemesh_common.membership import registry
from tunemesh.errors import NotFoundError, ResourceExhaustedError, UnavailableError

log = logging.getLogger(__name__)


def run_id(run_name: str) -> str:
    return run_name.removeprefix("runs/")


class NodeDirectory:
    """The live nodes of one kind, kept current by a NodeWatcher's on_change callback."""

    kind = "node"
    record: type = trainer_pb2.TrainerNode

    def __init__(self) -> None:
        self._nodes: dict = {}
        self.on_leave: Callable[[str], None] | None = None  # told when a node leaves
        self.on_join: Callable[[str], None] | None = None  # ... and when one (re)joins

    def on_change(self, node_id: str, value: bytes | None) -> None:
        if value is None:
            log.warning("%s %s left", self.kind, node_id)
            if self._nodes.pop(node_id, None) is not None and self.on_leave is not None:
                self.on_leave(node_id)
            return
        try:
            node = self.record.FromString(value)
        except DecodeError:
            log.error("ignoring an undecodable record of %s %s", self.kind, node_id)
            return
        joined = node_id not in self._nodes
        self._nodes[node_id] = node
        if joined:
            log.info("%s %s joined at %s", self.kind, node_id, node.address)
            if self.on_join is not None:
                self.on_join(node_id)

    def nodes(self) -> dict:
        return dict(self._nodes)

    def address_of(self, node_id: str) -> str:
        node = self._nodes.get(node_id)
        if node is None:
            raise UnavailableError(f"{self.kind.upper()}_GONE", f"{self.kind} {node_id} is not registered")
        return node.address

    def models(self) -> list[sessions_pb2.SupportedModel]:
        by_name = {m.name: m for node in self._nodes.values() for m in node.models}
        return [by_name[name] for name in sorted(by_name)]

    def model(self, name: str) -> sessions_pb2.SupportedModel:
        for node in self._nodes.values():
            for model in node.models:
                if model.name == name:
                    return model
        served = ", ".join(m.name for m in self.models()) or "none"
        raise NotFoundError("UNKNOWN_MODEL", f"no {self.kind} serves base model {name!r} (served: {served})")

    def serving_model(self, name: str) -> sessions_pb2.SupportedModel:
        """The model of existing work: UNAVAILABLE (retry) while no node serves it."""
        try:
            return self.model(name)
        except NotFoundError:
            raise UnavailableError(f"NO_{self.kind.upper()}", f"no {self.kind} of {name} is registered right now") from None

    def models_of(self, node_id: str) -> list[str]:
        """The models node `node_id` serves ([] when it is not registered)."""
        node = self._nodes.get(node_id)
        return [m.name for m in node.models] if node is not None else []

    def serving(self, name: str) -> list[str]:
        return sorted(n for n, node in self._nodes.items() if any(m.name == name for m in node.models))


class TrainerDirectory(NodeDirectory):
    kind = "trainer"
    record = trainer_pb2.TrainerNode


class SamplerDirectory(NodeDirectory):
    """Samplers, and the routing of sampling sessions to them."""

    kind = "sampler"
    record = sampler_pb2.SamplerNode

    def __init__(self) -> None:
        super().__init__()
        self.in_flight: collections.Counter[str] = collections.Counter()  # requests sent, not answered

    def route(self, base_model: str, adapter_key: str = "", exclude: str = "") -> str:
        """A sampler already holding the adapter if any, else the least loaded one."""
        self.serving_model(base_model)
        candidates = [n for n in self.serving(base_model) if n != exclude] or self.serving(base_model)
        holding = [n for n in candidates if adapter_key and adapter_key in self._nodes[n].resident_adapters]
        load = {n: max(self.in_flight[n], self._nodes[n].active_requests) for n in candidates}
        return min(holding or candidates, key=lambda n: (load[n], n))


class EtcdPlacement:
    """PlacementPort: the least-loaded trainer serving the model, written by etcd transaction."""

    def __init__(self, directory: TrainerDirectory, table) -> None:
        self._directory = directory
        self._table = table  # tunemesh_common.membership.registry.PlacementTable
        self._load: collections.Counter[str] = collections.Counter()

    async def place(self, run_name: str, base_model: str) -> str:
        self._directory.model(base_model)  # NotFoundError when nobody serves it
        nodes = self._directory.nodes()
        load = {n: max(self._load[n], nodes[n].adapters) for n in self._directory.serving(base_model)}
        free = [n for n, used in load.items() if used < nodes[n].max_adapters]
        if not free:
            raise ResourceExhaustedError("NO_CAPACITY", f"every trainer of {base_model} is full")
        node_id = min(free, key=lambda n: (load[n], n))
        self._load[node_id] += 1  # before the await: concurrent creates see this slot taken
        try:
            placed = await self._table.place_run(run_id(run_name), node_id)
        except registry.ETCD_ERRORS as err:
            self._load[node_id] -= 1
            raise UnavailableError("ETCD_UNAVAILABLE", f"cannot record the run's placement in etcd: {err!r}") from None
        except BaseException:
            self._load[node_id] -= 1
            raise
        if not placed:
            self._load[node_id] -= 1
            raise UnavailableError("PLACEMENT_CONFLICT", f"{run_name} was placed elsewhere concurrently")
        return node_id

    async def move(self, run_name: str, base_model: str, from_node: str) -> str:
        """A live trainer of the model with a free slot (`from_node` last), recorded by a
        transaction that checks the run is still on `from_node` (or already moved there)."""
        nodes = self._directory.nodes()
        self._directory.serving_model(base_model)  # UNAVAILABLE NO_TRAINER while none is registered
        load = {n: max(self._load[n], nodes[n].adapters) for n in self._directory.serving(base_model)}
        free = [n for n, used in load.items() if used < nodes[n].max_adapters or n == from_node]
        if not free:
            raise ResourceExhaustedError("NO_CAPACITY", f"no live trainer of {base_model} has a free slot")
        node_id = min(free, key=lambda n: (n == from_node, load[n], n))
        try:
            placement = await self._table.get_placement(run_id(run_name))
            if placement is None:  # a frozen run: placed anew
                if not await self._table.place_run(run_id(run_name), node_id):
                    raise UnavailableError("PLACEMENT_CONFLICT", f"{run_name} was placed elsewhere concurrently")
            elif placement.node_id != node_id and not await self._table.move_run(
                    run_id(run_name), placement.node_id, node_id):
                raise UnavailableError("PLACEMENT_CONFLICT", f"{run_name} was moved elsewhere concurrently")
        except registry.ETCD_ERRORS as err:
            raise UnavailableError("ETCD_UNAVAILABLE", f"cannot record the run's move in etcd: {err!r}") from None
        if node_id != from_node:
            self._load[node_id] += 1
            if from_node:
                self._load[from_node] -= 1
        return node_id

    async def release(self, run_name: str, node_id: str) -> None:
        self._load[node_id] -= 1
        try:
            await self._table.release_run(run_id(run_name), node_id)
        except registry.ETCD_ERRORS as err:  # the placement stays behind; the run is gone all the same
            log.warning("could not release %s on %s in etcd: %r", run_name, node_id, err)
