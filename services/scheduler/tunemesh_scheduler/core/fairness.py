"""Fair selection of a node's ready operations into one fused batch: deficit round robin
by tokens across tenants, then round robin across a tenant's runs.

Ready operations are grouped by tenant, then by run (a run has at most one ready
operation). A batch is filled in rounds. In each round every tenant with ready work gets
one quantum of tokens added to its deficit (the quantum is the largest ready operation's
token count, so every tenant can send at least one operation a round) and sends
operations while they fit its deficit and the batch's token budget; the first operation
of a batch always goes, even when larger than the budget on its own. Unused deficit
carries over to the next batch while the tenant keeps ready work, and is dropped when it
has none left.

Rounds go on only while every *contending* tenant still has ready work: a tenant with
nothing left, or one the caller names as contending that has nothing ready (it was just
served and its next operation is on its way), ends the batch after the current round.
So a tenant alone fills the batch up to the budget, while a tenant that floods many runs
gets no more than its quantum per round when another tenant is active: its number of
runs buys it nothing, and the other tenant never waits behind more than one batch. The
tenant that picked first moves to the back afterwards, so the first pick rotates.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

from tunemesh_scheduler.core.records import OperationRecord


class FairQueue:
    """Ready batchable operations of one node."""

    def __init__(self) -> None:
        self._tenants: dict[str, dict[str, OperationRecord]] = {}
        self._deficit: dict[str, int] = {}  # tenant -> tokens it may still send
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

    def ops(self) -> Iterator[OperationRecord]:
        """Every waiting operation (in no promised order)."""
        for runs in self._tenants.values():
            yield from runs.values()

    def depth_by_tenant(self) -> dict[str, int]:
        return {tenant: len(runs) for tenant, runs in self._tenants.items()}

    def take(self, token_budget: int, contending: Collection[str] = ()) -> list[OperationRecord]:
        """Remove and return the next batch: total num_tokens <= token_budget, except that
        the first operation is always taken even when larger on its own. `contending`:
        tenants active on this node besides those with ready work (recently served)."""
        if not self._tenants:
            return []
        first_tenant = next(iter(self._tenants))
        idle_contenders = set(contending) - set(self._tenants)
        if len(self._tenants) == 1 and not idle_contenders:
            chosen = self._fill(first_tenant, token_budget)
        else:
            chosen = self._rounds(token_budget, stop_after_one=bool(idle_contenders))
        for op in chosen:
            self._remove(op)
        for tenant in [t for t in self._deficit if t not in self._tenants]:
            del self._deficit[tenant]  # no ready work left: its deficit does not carry
        if first_tenant in self._tenants:
            self._tenants[first_tenant] = self._tenants.pop(first_tenant)
        return chosen

    def _fill(self, tenant: str, token_budget: int) -> list[OperationRecord]:
        """A tenant alone: its operations up to the budget."""
        chosen, tokens = [], 0
        for op in self._tenants[tenant].values():
            if chosen and tokens + op.num_tokens > token_budget:
                continue
            chosen.append(op)
            tokens += op.num_tokens
            if tokens >= token_budget:
                break
        return chosen

    def _rounds(self, token_budget: int, stop_after_one: bool) -> list[OperationRecord]:
        quantum = max(1, max(op.num_tokens for runs in self._tenants.values() for op in runs.values()))
        waiting = {tenant: list(runs.values()) for tenant, runs in self._tenants.items()}
        chosen: list[OperationRecord] = []
        tokens = 0
        while True:
            taken = len(chosen)
            for tenant, ops in waiting.items():
                # capped: a tenant whose next operation does not fit the budget keeps
                # gathering deficit only until it is the first to pick
                deficit = min(self._deficit.get(tenant, 0) + quantum, token_budget + quantum)
                for op in list(ops):
                    fits_budget = not chosen or tokens + op.num_tokens <= token_budget
                    if op.num_tokens <= deficit and fits_budget:
                        chosen.append(op)
                        ops.remove(op)
                        tokens += op.num_tokens
                        deficit -= op.num_tokens
                self._deficit[tenant] = deficit
            done = stop_after_one or tokens >= token_budget or len(chosen) == taken
            if done or not all(waiting.values()):
                return chosen

    def _remove(self, op: OperationRecord) -> None:
        runs = self._tenants[op.tenant]
        del runs[op.run]
        if not runs:
            del self._tenants[op.tenant]
        self._size -= 1
