"""Trainer membership (from the etcd watch) and run placement (etcd transactions)."""

from __future__ import annotations

import collections
import logging

from google.protobuf.message import DecodeError

from tunemesh.internal.v1 import trainer_pb2
from tunemesh.v1 import sessions_pb2
from tunemesh_common.errors import NotFound, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)


def run_id(run_name: str) -> str:
    return run_name.removeprefix("runs/")


class TrainerDirectory:
    """The live trainer nodes, kept current by a NodeWatcher's on_change callback."""

    def __init__(self) -> None:
        self._nodes: dict[str, trainer_pb2.TrainerNode] = {}

    def on_change(self, node_id: str, value: bytes | None) -> None:
        if value is None:
            log.warning("trainer %s left", node_id)
            self._nodes.pop(node_id, None)
            return
        try:
            node = trainer_pb2.TrainerNode.FromString(value)
        except DecodeError:
            log.error("ignoring an undecodable record of trainer %s", node_id)
            return
        if node_id not in self._nodes:
            log.info("trainer %s joined at %s", node_id, node.address)
        self._nodes[node_id] = node

    def nodes(self) -> dict[str, trainer_pb2.TrainerNode]:
        return dict(self._nodes)

    def address_of(self, node_id: str) -> str:
        node = self._nodes.get(node_id)
        if node is None:
            raise Unavailable("TRAINER_GONE", f"trainer {node_id} is not registered")
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
        raise NotFound("UNKNOWN_MODEL", f"no trainer serves base model {name!r} (served: {served})")

    def serving_model(self, name: str) -> sessions_pb2.SupportedModel:
        """The model of an existing run: UNAVAILABLE (retry) while no trainer serves it."""
        try:
            return self.model(name)
        except NotFound:
            raise Unavailable("NO_TRAINER", f"no trainer of {name} is registered right now") from None

    def serving(self, name: str) -> list[str]:
        return sorted(n for n, node in self._nodes.items() if any(m.name == name for m in node.models))


class EtcdPlacement:
    """PlacementPort: the least-loaded trainer serving the model, written by etcd transaction."""

    def __init__(self, directory: TrainerDirectory, table) -> None:
        self._directory = directory
        self._table = table  # tunemesh_common.registry.PlacementTable
        self._load: collections.Counter[str] = collections.Counter()

    async def place(self, run_name: str, base_model: str) -> str:
        self._directory.model(base_model)  # NotFound when nobody serves it
        nodes = self._directory.nodes()
        load = {n: max(self._load[n], nodes[n].adapters) for n in self._directory.serving(base_model)}
        free = [n for n, used in load.items() if used < nodes[n].max_adapters]
        if not free:
            raise ResourceExhausted("NO_CAPACITY", f"every trainer of {base_model} is full")
        node_id = min(free, key=lambda n: (load[n], n))
        self._load[node_id] += 1  # before the await: concurrent creates see this slot taken
        try:
            placed = await self._table.place_run(run_id(run_name), node_id)
        except BaseException:
            self._load[node_id] -= 1
            raise
        if not placed:
            self._load[node_id] -= 1
            raise Unavailable("PLACEMENT_CONFLICT", f"{run_name} was placed elsewhere concurrently")
        return node_id

    async def release(self, run_name: str, node_id: str) -> None:
        await self._table.release_run(run_id(run_name), node_id)
        self._load[node_id] -= 1
