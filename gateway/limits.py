"""Rate limits, pure, with an injectable clock.

:class:`SlidingWindow` admits at most N events in any window (call set-up
pacing). :class:`RateLimit` keeps log lines a stranger can trigger once per
message from flooding the log: a flood would fill the disk and hide everything
else; when lines were held back, the next allowed line says how many.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable


class SlidingWindow:
    """At most ``limit`` events in any ``seconds``-long window."""

    def __init__(
        self, limit: int, seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.seconds = seconds
        self._clock = clock
        self._events: deque[float] = deque()

    def _prune(self, now: float) -> None:
        while self._events and now - self._events[0] >= self.seconds:
            self._events.popleft()

    def full(self) -> bool:
        """Would one more event now exceed the limit?"""
        self._prune(self._clock())
        return len(self._events) >= self.limit

    def busy(self) -> bool:
        """Has any event happened within the window?"""
        self._prune(self._clock())
        return bool(self._events)

    def add(self) -> bool:
        """Record an event if the window has room; ``False`` (and nothing recorded) if not."""
        now = self._clock()
        self._prune(now)
        if len(self._events) >= self.limit:
            return False
        self._events.append(now)
        return True


class RateLimit:
    """At most ``burst`` events per ``period`` seconds (a fixed window); counts the rest.

    :meth:`take` returns ``None`` when the event must not be logged, otherwise
    the number of events suppressed since the last one that was logged.
    """

    def __init__(
        self, burst: int, period: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if burst < 1 or period <= 0:
            raise ValueError("burst must be at least 1 and period positive")
        self.burst = burst
        self.period = period
        self._clock = clock
        self._window_start = -math.inf
        self._used = 0
        self._suppressed = 0

    def take(self) -> int | None:
        now = self._clock()
        if now - self._window_start >= self.period:
            self._window_start = now
            self._used = 0
        if self._used >= self.burst:
            self._suppressed += 1
            return None
        self._used += 1
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed

    @property
    def suppressed(self) -> int:
        """Events suppressed since the last one allowed (to report when the source ends)."""
        return self._suppressed


def suppressed_note(count: int) -> str:
    """A note for the next log line about ``count`` held-back ones (``""`` if none)."""
    return f" ({count} similar not logged before this one)" if count else ""
