"""A small rate limit for log lines that a stranger can trigger once per message.

Anything a browser can cause per message (a handler failure, a refused call)
must not write one log line per message: a flood would fill the disk and hide
everything else. Each source keeps a :class:`RateLimit` and asks it before
logging; when lines were held back, the next allowed line says how many.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


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
