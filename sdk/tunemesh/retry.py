"""Retry policy for unary calls: exponential backoff with jitter under a total deadline.

Every RPC the SDK retries is idempotent: training calls carry a request_id and seq_id
that a retry reuses, and the rest are reads. Retried status codes:

- UNAVAILABLE: node or connection down; the canonical "try again".
- DEADLINE_EXCEEDED: one attempt ran past its own deadline.
- RESOURCE_EXHAUSTED: capacity or rate limits (Tinker retries HTTP 429 too). gRPC's
  own refusal of a request over a message size limit is not retried: errors.py maps it
  to INVALID_ARGUMENT [REQUEST_TOO_LARGE].
- ABORTED: a concurrency conflict on the server (e.g. a placement race).

except RESOURCE_EXHAUSTED with a reason in FINAL_REASONS: quotas that only the caller's
own action frees (deleting runs or checkpoints), a full disk, and a request over its RPC's
size limit, where waiting out the retry deadline would only delay the report. Transient quotas (SAMPLE_ROWS_QUOTA, the
tenant's rows in flight at a sampler) are retried with backoff like any capacity limit.

INTERNAL and UNKNOWN are not retried: the service maps unexpected bugs to INTERNAL, and
repeating a request that hit a bug only delays the report. A training submit that gets
one is in doubt, and its TrainingClient re-sends it before the run's next call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from tunemesh.errors import error_from_rpc

logger = logging.getLogger(__name__)

RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)

FINAL_REASONS = frozenset({"TENANT_RUN_QUOTA", "STORAGE_QUOTA", "DISK_FULL", "REQUEST_TOO_LARGE"})
"""Reasons of a retryable code that are not retried (see the module docstring)."""

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How long and how often to retry a failed call."""

    initial_backoff_s: float = 0.5
    # Low enough that a client notices a failed-over scheduler within a second or two of
    # it serving (the standby takes over once the leader's lease lapses, ~5 s).
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    total_timeout_s: float = 300.0
    attempt_timeout_s: float = 60.0
    retryable_codes: frozenset[grpc.StatusCode] = RETRYABLE_CODES

    def backoff(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Delay before retry number `attempt` (0-based): half fixed, half random."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**attempt)
        return ceiling / 2 + rand() * ceiling / 2


def call_with_retry(
    attempt: Callable[[float], T],
    policy: RetryPolicy,
    *,
    what: str = "call",
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run `attempt(timeout_s)` until it succeeds, fails for good, or the deadline passes.

    Raises the typed TunemeshError of the last failure.
    """
    deadline = clock() + policy.total_timeout_s
    retries = 0
    while True:
        remaining = deadline - clock()
        try:
            return attempt(max(0.001, min(policy.attempt_timeout_s, remaining)))
        except grpc.RpcError as err:
            delay = _delay_before_retry(err, policy, retries, deadline - clock(), what)
        sleep(delay)
        retries += 1


async def call_with_retry_async(
    attempt: Callable[[float], Awaitable[T]],
    policy: RetryPolicy,
    *,
    what: str = "call",
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """`call_with_retry` for a coroutine attempt, sleeping with asyncio (on the SDK loop)."""
    deadline = clock() + policy.total_timeout_s
    retries = 0
    while True:
        remaining = deadline - clock()
        try:
            return await attempt(max(0.001, min(policy.attempt_timeout_s, remaining)))
        except grpc.RpcError as err:
            delay = _delay_before_retry(err, policy, retries, deadline - clock(), what)
        await asyncio.sleep(delay)
        retries += 1


def _delay_before_retry(err: grpc.RpcError, policy: RetryPolicy, retries: int, time_left: float, what: str) -> float:
    """How long to wait before retry number `retries + 1` of a failed attempt; raises the
    typed error when it is final or the next try would start past the deadline."""
    error = error_from_rpc(err)
    delay = policy.backoff(retries)
    if not _retryable(error, policy) or delay >= time_left:
        raise error from None
    logger.info("%s failed with %s; retry %d in %.2fs", what, error, retries + 1, delay)
    return delay


def _retryable(error, policy: RetryPolicy) -> bool:
    return error.code in policy.retryable_codes and error.reason not in FINAL_REASONS
