"""Failed API keys, refused at the gateway before they reach the scheduler.

The scheduler throttles failed keys per caller address, and every Tinker user reaches it
from the gateway's one address: unchecked, one user guessing keys would get the gateway,
and with it every Tinker user, blocked. So the gateway keeps its own tally per client
address (a client over `max_failures` within the window waits, 429) and remembers keys
the scheduler refused for a while (refused again here, 401, without a call), so one
client guessing keys one call at a time cannot spend the scheduler's allowance for the
gateway's address. Not covered: calls the gateway answers before the scheduler has seen
the key (asample and create_model run in the background and fail through their futures;
client_config answers defaults), guesses sent in parallel before the first answer, and
several clients together. Pure: time is passed in.
"""

from __future__ import annotations

import collections
import hashlib

from tunemesh_common.service.throttle import FailureThrottle

MAX_CLIENT_FAILURES = 4  # per client address and window: under half the scheduler's allowance
BAD_KEY_MEMORY_S = 300.0
MAX_BAD_KEYS = 10_000


class KeyGuard:
    def __init__(self, throttle: FailureThrottle | None = None, remember_s: float = BAD_KEY_MEMORY_S,
                 max_keys: int = MAX_BAD_KEYS) -> None:
        self.throttle = throttle or FailureThrottle(max_failures=MAX_CLIENT_FAILURES)
        self._remember_s, self._max_keys = remember_s, max_keys
        self._bad: collections.OrderedDict[bytes, float] = collections.OrderedDict()  # key digest -> until

    def wait_s(self, client: str, now: float) -> float:
        """How long `client` must wait before its next attempt (0: it may try)."""
        return self.throttle.blocked_for(client, now)

    def known_bad(self, key: str, now: float) -> bool:
        until = self._bad.get(_digest(key))
        return until is not None and until > now

    def refused(self, client: str, key: str, now: float) -> None:
        """The scheduler refused `key` from `client`."""
        self.throttle.failed(client, now)
        digest = _digest(key)
        self._bad.pop(digest, None)
        self._bad[digest] = now + self._remember_s
        while len(self._bad) > self._max_keys:
            self._bad.popitem(last=False)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
