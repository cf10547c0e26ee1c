"""Failed attempts per source, and which sources must wait: pure logic, time passed in.

A source with `max_failures` failures within `window_s` is blocked for `block_s`. At most
`max_sources` sources are remembered (the least recently seen forgotten first), so memory
stays bounded whatever the number of callers.
"""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass
class _Source:
    failures: collections.deque  # times of the recent failures, oldest first (at most max_failures)
    blocked_until: float = float("-inf")


class FailureThrottle:
    def __init__(self, max_failures: int = 10, window_s: float = 60.0, block_s: float = 60.0,
                 max_sources: int = 10_000) -> None:
        if max_failures < 1 or window_s <= 0 or block_s <= 0 or max_sources < 1:
            raise ValueError("max_failures, window_s, block_s and max_sources must be positive")
        self.max_failures, self.window_s, self.block_s, self.max_sources = max_failures, window_s, block_s, max_sources
        self._sources: collections.OrderedDict[str, _Source] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._sources)

    def blocked_for(self, source: str, now: float) -> float:
        """Seconds `source` must still wait (0: it may try)."""
        entry = self._sources.get(source)
        return max(0.0, entry.blocked_until - now) if entry is not None else 0.0

    def failed(self, source: str, now: float) -> float:
        """Count a failure of `source`; returns how long it is now blocked (0: not blocked)."""
        entry = self._sources.pop(source, None) or _Source(collections.deque(maxlen=self.max_failures))
        self._sources[source] = entry  # most recently seen last
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)
        while entry.failures and entry.failures[0] <= now - self.window_s:
            entry.failures.popleft()
        entry.failures.append(now)
        if len(entry.failures) >= self.max_failures:
            entry.blocked_until = now + self.block_s
            entry.failures.clear()
        return self.blocked_for(source, now)
