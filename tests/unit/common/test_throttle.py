"""throttle.py: failed attempts per source, with time passed in (no sleeps)."""

from __future__ import annotations

import pytest

from tunemesh_common.service.throttle import FailureThrottle


def test_a_source_is_blocked_after_max_failures_within_the_window_then_released():
    throttle = FailureThrottle(max_failures=3, window_s=10, block_s=30)
    assert throttle.failed("a", 0.0) == 0 and throttle.failed("a", 5.0) == 0
    assert throttle.blocked_for("a", 6.0) == 0
    assert throttle.failed("a", 9.0) == 30  # third failure within 10 s
    assert throttle.blocked_for("a", 20.0) == 19
    assert throttle.blocked_for("a", 39.0) == 0  # released
    assert throttle.failed("a", 40.0) == 0  # and its count starts over


def test_failures_older_than_the_window_do_not_count():
    throttle = FailureThrottle(max_failures=3, window_s=10, block_s=30)
    for now in (0.0, 6.0, 12.0, 18.0, 24.0):  # never 3 within 10 s
        assert throttle.failed("a", now) == 0


def test_one_source_blocked_leaves_the_others_alone():
    throttle = FailureThrottle(max_failures=1, window_s=10, block_s=30)
    assert throttle.failed("a", 0.0) == 30
    assert throttle.blocked_for("b", 0.0) == 0
    assert throttle.failed("b", 1.0) == 30 and throttle.blocked_for("c", 1.0) == 0


def test_memory_is_bounded_forgetting_the_least_recently_seen_source():
    throttle = FailureThrottle(max_failures=2, window_s=10, block_s=30, max_sources=3)
    for i in range(100):
        throttle.failed(f"s{i}", float(i) / 100)
    assert len(throttle) == 3
    throttle = FailureThrottle(max_failures=2, window_s=10, block_s=30, max_sources=2)
    throttle.failed("a", 0.0)
    throttle.failed("b", 0.1)
    throttle.failed("a", 0.2)  # a is blocked and the most recently seen
    throttle.failed("c", 0.3)  # b goes
    assert throttle.blocked_for("a", 1.0) > 0 and set(throttle._sources) == {"a", "c"}


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        FailureThrottle(max_failures=0)
