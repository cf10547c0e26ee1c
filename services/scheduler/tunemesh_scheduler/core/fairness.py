"""Fair selection of a node's ready operations into one fused batch.

Ready operations are grouped by tenant, then by run (a run has at most one ready
operation). A batch is filled in rounds: each round takes the next ready run of every
tenant, in the current tenant order, until the token budget is spent. The tenant that
picked first moves to the back afterwards, so the first pick rotates and no tenant can
starve another by flooding runs. Runs that were skipped keep their place.
"""

from __future__ import annotations

from collections.abc import Iterator

from tunemesh_scheduler.core.records import OperationRecord


class FairQueue:
    """Ready batchable operations of one node."""

    def __init__(self) -> None:
        self._tenants: dict[str, dict[str, OperationRecord]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, op: OperationRecord) -> None:
        """Add a run's ready head operation (again: no change; a run holds one place)."""
        runs = self._tenants.setdefault(op.tenant, {})
        if op.run not in runs:
            self._size += 1
        runs[op.run] = op

    def discard(self, op: OperationRecord) -> bool:
        """Remove `op` if it is still waiting; True when it was."""
        runs = self._tenants.get(op.tenant)
        if runs is None or runs.get(op.run) is not op:
            return False
        self._remove(op)
        return True

    def depth_by_tenant(self) -> dict[str, int]:
        return {tenant: len(runs) for tenant, runs in self._tenants.items()}

    def take(self, token_budget: int) -> list[OperationRecord]:
        """Remove and return the next batch: total num_tokens <= token_budget, except
        that the first operation is always taken even when larger on its own."""
        chosen: list[OperationRecord] = []
        tokens = 0
        first_tenant = next(iter(self._tenants), None)
        for op in self._fair_order():
            if chosen and tokens + op.num_tokens > token_budget:
                continue
            chosen.append(op)
            tokens += op.num_tokens
            if tokens >= token_budget:
                break
        for op in chosen:
            self._remove(op)
        if first_tenant in self._tenants:
            self._tenants[first_tenant] = self._tenants.pop(first_tenant)
        return chosen

    def _fair_order(self) -> Iterator[OperationRecord]:
        """Round-robin over tenants, each round one more run of every tenant."""
        iterators = [iter(list(runs.values())) for runs in self._tenants.values()]
        while iterators:
            alive = []
            for runs in iterators:
                op = next(runs, None)
                if op is not None:
                    alive.append(runs)
                    yield op
            iterators = alive

    def _remove(self, op: OperationRecord) -> None:
        runs = self._tenants[op.tenant]
        del runs[op.run]
        if not runs:
            del self._tenants[op.tenant]
        self._size -= 1
