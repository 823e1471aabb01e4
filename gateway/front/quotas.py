"""Call quotas across connections: per user, per source address, and for the gateway.

A connection's own limits (calls at once, call requests per second) live in
:mod:`gateway.front.calls`; these count every call of a token's ``sub`` (a
user may open many tabs) and of a source address (a bot may open many
sockets), live and per minute. Pure bookkeeping with an injectable clock: the
call manager asks :meth:`CallQuotas.admit` before it routes a call, tells
:meth:`CallQuotas.started` once a worker has it, and calls
:meth:`CallQuotas.release` when the call is gone, so every counter is back to
zero when the calls end.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.limits import SlidingWindow
from gateway.outcomes import Refusal, Refused


@dataclass(frozen=True)
class QuotaLimits:
    """The limits; 0 turns one off."""

    calls_per_user: int = 0
    calls_per_ip: int = 0
    calls_total: int = 0
    per_minute_per_user: int = 0
    per_minute_per_ip: int = 0


@dataclass
class CallQuotas:
    limits: QuotaLimits
    clock: Callable[[], float] = time.monotonic
    live_by_user: Counter[str] = field(default_factory=Counter)
    live_by_ip: Counter[str] = field(default_factory=Counter)
    live_total: int = 0
    _user_minutes: dict[str, SlidingWindow] = field(default_factory=dict)
    _ip_minutes: dict[str, SlidingWindow] = field(default_factory=dict)

    def admit(self, user: str | None, address: str) -> None:
        """Count a new call of ``user`` (a token's ``sub``; None without auth) from
        ``address``, or raise :class:`Refused` naming the limit it would pass."""
        limits = self.limits
        if limits.calls_total and self.live_total >= limits.calls_total:
            raise Refused(
                Refusal.GATEWAY_CALL_LIMIT,
                f"call: the gateway already carries {self.live_total} calls (its limit)",
            )
        if (
            user is not None
            and limits.calls_per_user
            and (self.live_by_user[user] >= limits.calls_per_user)
        ):
            raise Refused(
                Refusal.USER_CALL_LIMIT,
                f"call: this user already has {limits.calls_per_user} calls (the limit)",
            )
        if limits.calls_per_ip and self.live_by_ip[address] >= limits.calls_per_ip:
            raise Refused(
                Refusal.ADDRESS_CALL_LIMIT,
                f"call: this address already has {limits.calls_per_ip} calls (the limit)",
            )
        user_window = self._window(self._user_minutes, user, limits.per_minute_per_user)
        ip_window = self._window(self._ip_minutes, address, limits.per_minute_per_ip)
        if user_window is not None and user_window.full():
            raise Refused(
                Refusal.USER_CALL_RATE,
                f"call: this user started {limits.per_minute_per_user} calls in the last minute",
            )
        if ip_window is not None and ip_window.full():
            raise Refused(
                Refusal.ADDRESS_CALL_RATE,
                f"call: this address started {limits.per_minute_per_ip} calls in the last minute",
            )
        if user is not None:
            self.live_by_user[user] += 1
        self.live_by_ip[address] += 1
        self.live_total += 1

    def started(self, user: str | None, address: str) -> None:
        """An admitted call went to a worker: count it in this minute's starts.

        Separate from :meth:`admit`: a call the gateway itself turns away after
        admission (no worker free, set-up pacing) is not held against the user.
        """
        limits = self.limits
        for windows, key, limit in (
            (self._user_minutes, user, limits.per_minute_per_user),
            (self._ip_minutes, address, limits.per_minute_per_ip),
        ):
            window = self._window(windows, key, limit)
            if window is not None:
                window.add()

    def release(self, user: str | None, address: str) -> None:
        """A call admitted for ``user`` from ``address`` is gone."""
        if user is not None:
            _decrement(self.live_by_user, user)
        _decrement(self.live_by_ip, address)
        self.live_total = max(0, self.live_total - 1)

    def _window(
        self, windows: dict[str, SlidingWindow], key: str | None, limit: int
    ) -> SlidingWindow | None:
        if key is None or not limit:
            return None
        if len(windows) > 1024:  # forget keys whose minute has passed
            for stale in [k for k, w in windows.items() if not w.busy()]:
                del windows[stale]
        window = windows.get(key)
        if window is None:
            window = windows[key] = SlidingWindow(limit, 60.0, self.clock)
        return window

    def snapshot(self) -> dict[str, int]:
        """The live counters (for ``/debug/census``): all zero when no call is up."""
        return {
            "calls": self.live_total,
            "users": sum(self.live_by_user.values()),
            "addresses": sum(self.live_by_ip.values()),
        }


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
