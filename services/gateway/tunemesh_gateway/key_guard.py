"""API keys at the gateway, checked before any call carries them to the scheduler.

The scheduler throttles failed keys per caller address, and every Tinker user reaches it
from the gateway's one address: if the gateway passed guesses on, users guessing keys
would get the gateway, and with it every Tinker user, blocked. Two ways to stop them:

- `KeyCheck` (the gateway is given the mesh's keys file, `--api-keys-file`, as `tunemesh
  up` and the chart do): every key is verified here, as the scheduler verifies it
  (`KeyAuthenticator`: a throttle per client address, below the scheduler's, and a
  caller's unverified keys one at a time, so parallel guesses meet the limit too). The
  scheduler only ever sees keys that verified, so no number of clients guessing together,
  in parallel or not, can get the gateway's address throttled. A key the scheduler still
  refuses (revoked in its copy of the file first) is forgotten here and counts as a
  failure of the client (docs/security.md: the window that leaves).
- `KeyGuard` (no keys file): a tally per client address (a client over `max_failures`
  within the window waits, 429) and a memory of keys the scheduler refused (refused again
  here, 401, without a call). Not covered: calls the gateway answers before the scheduler
  has seen the key (asample and create_model fail through their futures), guesses sent in
  parallel before the first answer, and several clients together.

Both are pure but for `KeyCheck`'s KDF: time is passed in.
"""

from __future__ import annotations

import collections
import hashlib

from tunemesh.errors import ResourceExhaustedError, UnauthenticatedError
from tunemesh_common.service.api_keys import KeyAuthenticator
from tunemesh_common.service.throttle import FailureThrottle
from tunemesh_gateway.status import HttpError

MAX_CLIENT_FAILURES = 4  # per client address and window: under half the scheduler's allowance
BAD_KEY_MEMORY_S = 300.0
MAX_BAD_KEYS = 10_000


class KeyCheck:
    """Keys verified against the mesh's keys file before they are forwarded."""

    def __init__(self, authenticator: KeyAuthenticator) -> None:
        self._auth = authenticator

    async def admit(self, key: str, client: str, now: float) -> None:
        """Return if `key` verifies; HttpError 401 if not, 429 while `client` must wait."""
        try:
            await self._auth.authenticate(key, client)
        except UnauthenticatedError as err:
            raise HttpError(401, f"UNAUTHENTICATED: {err.message}") from None
        except ResourceExhaustedError as err:
            raise HttpError(429, f"too many failed API keys from this address: {err.message}") from None

    def refused(self, client: str, key: str, now: float) -> None:
        """The scheduler refused a key that verified here (revoked in its copy of the file
        first): verified again next time, and a failure of `client`."""
        self._auth.forget(key)
        self._auth.throttle.failed(client, now)


class KeyGuard:
    """Without the keys file: failed keys tallied per client, refused keys remembered."""

    def __init__(self, throttle: FailureThrottle | None = None, remember_s: float = BAD_KEY_MEMORY_S,
                 max_keys: int = MAX_BAD_KEYS) -> None:
        self.throttle = throttle or FailureThrottle(max_failures=MAX_CLIENT_FAILURES)
        self._remember_s, self._max_keys = remember_s, max_keys
        self._bad: collections.OrderedDict[bytes, float] = collections.OrderedDict()  # key digest -> until

    async def admit(self, key: str, client: str, now: float) -> None:
        """Return if `key` may be forwarded; HttpError 429 while `client` must wait, 401 for
        a key the scheduler refused lately."""
        wait_s = self.wait_s(client, now)
        if wait_s:
            raise HttpError(429, f"too many failed API keys from this address; try again in {wait_s:.0f} s")
        if self.known_bad(key, now):
            raise HttpError(401, "UNAUTHENTICATED: this API key was refused")

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
