"""Training runs: creation (placement + adapter), idempotency by request id, listing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from tunemesh.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    TunemeshError,
    UnavailableError,
)
from tunemesh_scheduler.core.ports import PlacementPort, StoreWrite, TrainerPort
from tunemesh_scheduler.core.records import RunRecord

log = logging.getLogger(__name__)

Prepare = Callable[[RunRecord], Awaitable[None]]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


class RunRegistry:
    """In-memory runs keyed by name, one creation order list per tenant."""

    def __init__(
        self,
        placement: PlacementPort,
        trainer: TrainerPort,
        clock: Callable[[], float],
        new_id: Callable[[], str],
        max_runs_per_tenant: int = 0,
        note: Callable[[StoreWrite], int] = lambda write: 0,
    ) -> None:
        self._note = note  # journals every created or deleted run
        self._max_runs_per_tenant = max_runs_per_tenant  # 0: no quota
        self._placement = placement
        self._trainer = trainer
        self._clock = clock
        self._new_id = new_id
        self._runs: dict[str, RunRecord] = {}
        self._by_tenant: dict[str, list[str]] = {}
        # tenant -> creates past the quota check and not yet registered or failed: they
        # hold a quota slot, so concurrent creates cannot all pass the check at once
        self._creating: dict[str, int] = {}
        # (tenant, request_id) -> (payload key, future of the run being created)
        self._requests: dict[tuple[str, str], tuple[tuple, asyncio.Future[RunRecord]]] = {}

    def __len__(self) -> int:
        return len(self._runs)

    async def create(
        self, tenant: str, session: str, base_model: str, lora: Any, request_id: str,
        prepare: Prepare | None = None, prepare_key: Any = None, user_metadata: tuple[tuple[str, str], ...] = (),
    ) -> RunRecord:
        """Place and create a run; a retry with the same request id gets the same run.

        `prepare` (e.g. loading a checkpoint) runs on the new record before the run is
        visible; if it fails the run is undone. `prepare_key` names it for idempotency.
        """
        if not request_id:
            return await self._place_and_create(tenant, session, base_model, lora, prepare, "", user_metadata)
        key = (tenant, request_id)
        payload = (session, base_model, lora, prepare_key, user_metadata)
        seen = self._requests.get(key)
        if seen is not None:
            if seen[0] != payload:
                raise AlreadyExistsError(
                    "REQUEST_ID_REUSED", f"request id {request_id!r} was used for another run"
                )
            return await asyncio.shield(seen[1])
        future: asyncio.Future[RunRecord] = asyncio.get_running_loop().create_future()
        self._requests[key] = (payload, future)
        try:
            record = await self._place_and_create(tenant, session, base_model, lora, prepare, request_id,
                                                  user_metadata)
        except BaseException as exc:
            del self._requests[key]  # a failed create may be retried with the same id
            _fail_future(future, exc)
            raise
        future.set_result(record)
        return record

    async def _place_and_create(
        self, tenant: str, session: str, base_model: str, lora: Any, prepare: Prepare | None, request_id: str,
        user_metadata: tuple[tuple[str, str], ...],
    ) -> RunRecord:
        self._reserve_slot(tenant)
        try:
            return await self._place_and_create_reserved(tenant, session, base_model, lora, prepare, request_id,
                                                         user_metadata)
        finally:
            self._creating[tenant] -= 1  # a created run now counts in _by_tenant instead
            if not self._creating[tenant]:
                del self._creating[tenant]

    def _reserve_slot(self, tenant: str) -> None:
        """Count the create against the tenant's quota now, before any await, or raise
        ResourceExhaustedError(TENANT_RUN_QUOTA)."""
        held = len(self._by_tenant.get(tenant, ()))
        creating = self._creating.get(tenant, 0)
        if self._max_runs_per_tenant and held + creating >= self._max_runs_per_tenant:
            raise ResourceExhaustedError(
                "TENANT_RUN_QUOTA",
                f"tenant holds {held} runs and is creating {creating} (the quota is {self._max_runs_per_tenant})",
            )
        self._creating[tenant] = creating + 1

    async def _place_and_create_reserved(
        self, tenant: str, session: str, base_model: str, lora: Any, prepare: Prepare | None, request_id: str,
        user_metadata: tuple[tuple[str, str], ...],
    ) -> RunRecord:
        name = f"runs/{self._new_id()}"
        node_id = await self._placement.place(name, base_model)
        record = RunRecord(
            name=name,
            tenant=tenant,
            session=session,
            base_model=base_model,
            lora=lora,
            node_id=node_id,
            create_time=self._clock(),
            request_id=request_id,
            user_metadata=user_metadata,
        )
        try:
            await self._trainer.create_adapter(node_id, name, base_model, lora, record.epoch)
            if prepare is not None:
                await prepare(record)
        except BaseException:
            await asyncio.shield(self._undo_create(name, node_id))
            raise
        self.restore(record)
        self._note(StoreWrite(record))
        log.info("run created", extra={"run": name, "tenant": tenant, "node": node_id})
        return record

    async def _undo_create(self, name: str, node_id: str) -> None:
        """Best effort: the trainer may still create the adapter (e.g. after a timeout);
        its calls run in order, so a delete queued now lands after that create."""
        try:
            await self._trainer.delete_adapter(node_id, name)
        except Exception as exc:  # NotFoundError when it was never created: nothing to undo
            log.info("undo of %s on %s: %r", name, node_id, exc)
        await self._placement.release(name, node_id)

    async def delete(self, record: RunRecord) -> None:
        """Forget the run at once (later calls get NotFoundError), then free its adapter slot."""
        del self._runs[record.name]
        self._by_tenant[record.tenant].remove(record.name)
        self._note(StoreWrite(record, delete=True))
        try:
            await self._trainer.delete_adapter(record.node_id, record.name)
        except TunemeshError as exc:  # NotFoundError or a trainer that is gone: no slot left to free
            log.warning("deleting the adapter of %s on %s: %r", record.name, record.node_id, exc)
        await self._placement.release(record.name, record.node_id)

    def restore(self, record: RunRecord) -> None:
        """Register an existing run (e.g. reloaded from durable metadata); a retry of
        the CreateTrainingRun call that made it gets it back."""
        self._runs[record.name] = record
        self._by_tenant.setdefault(record.tenant, []).append(record.name)
        if record.request_id and (record.tenant, record.request_id) not in self._requests:
            future: asyncio.Future[RunRecord] = asyncio.get_running_loop().create_future()
            future.set_result(record)
            key = (record.session, record.base_model, record.lora, record.origin, record.user_metadata)
            self._requests[(record.tenant, record.request_id)] = (key, future)

    def get(self, tenant: str, name: str) -> RunRecord:
        """The tenant's run, or NotFoundError(RUN_NOT_FOUND)."""
        record = self._runs.get(name)
        if record is None or record.tenant != tenant:
            raise NotFoundError("RUN_NOT_FOUND", f"run {name!r} not found")
        return record

    def list(self, tenant: str, page_size: int, page_token: str) -> tuple[list[RunRecord], str]:
        """One page of the tenant's runs in creation order, and the next page token
        ('' when there is no more). The token is an opaque offset."""
        if page_size < 0:
            raise InvalidArgumentError("INVALID_PAGE_SIZE", "page_size must be >= 0")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        start = _parse_token(page_token)
        names = self._by_tenant.get(tenant, [])
        page = [self._runs[n] for n in names[start : start + size]]
        end = start + len(page)
        return page, (str(end) if end < len(names) else "")


def _parse_token(token: str) -> int:
    if not token:
        return 0
    if not token.isdigit():
        raise InvalidArgumentError("INVALID_PAGE_TOKEN", f"bad page token {token!r}")
    return int(token)


def _fail_future(future: asyncio.Future, exc: BaseException) -> None:
    if isinstance(exc, asyncio.CancelledError):  # concurrent retries get a retryable error
        exc = UnavailableError("CREATE_INTERRUPTED", "the run's creation was interrupted; retry")
    future.set_exception(exc)
    future.exception()  # mark retrieved so asyncio logs no "never retrieved" warning
