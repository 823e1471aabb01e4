"""Rate limits: a sliding window of recent events. Pure; the clock is injectable."""

from __future__ import annotations

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

    def add(self) -> bool:
        """Record an event if the window has room; ``False`` (and nothing recorded) if not."""
        now = self._clock()
        self._prune(now)
        if len(self._events) >= self.limit:
            return False
        self._events.append(now)
        return True
