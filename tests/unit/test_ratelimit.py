"""The log rate limit: a fixed window, and a count of what was held back."""

from __future__ import annotations

import pytest

from gateway.limits import RateLimit, suppressed_note


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_suppressed_then_counted():
    clock = Clock()
    limit = RateLimit(3, 60.0, clock)
    assert [limit.take() for _ in range(3)] == [0, 0, 0]
    assert [limit.take() for _ in range(5)] == [None] * 5
    assert limit.suppressed == 5
    clock.now += 59.9
    assert limit.take() is None
    clock.now += 0.1
    assert limit.take() == 6  # the first line of the new window reports the held-back ones
    assert limit.suppressed == 0
    assert [limit.take() for _ in range(3)] == [0, 0, None]


def test_note():
    assert suppressed_note(0) == ""
    assert "4 similar not logged" in suppressed_note(4)


@pytest.mark.parametrize(("burst", "period"), [(0, 1.0), (1, 0.0)], ids=["no-burst", "no-period"])
def test_rejects_nonsense(burst, period):
    with pytest.raises(ValueError):
        RateLimit(burst, period)
