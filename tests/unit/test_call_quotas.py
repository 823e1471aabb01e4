"""Call quotas across connections (:mod:`gateway.front.quotas`), with a fake clock."""

from __future__ import annotations

import pytest

from gateway.front.quotas import CallQuotas, QuotaLimits
from gateway.outcomes import Refusal, Refused


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refusal(quotas: CallQuotas, user: str | None, address: str) -> Refusal | None:
    try:
        quotas.admit(user, address)
    except Refused as refused:
        return refused.refusal
    quotas.started(user, address)
    return None


def test_each_limit_trips_with_its_own_refusal_and_counts_return_to_zero():
    clock = Clock()
    quotas = CallQuotas(
        QuotaLimits(
            calls_per_user=2,
            calls_per_ip=3,
            calls_total=4,
            per_minute_per_user=5,
            per_minute_per_ip=6,
        ),
        clock,
    )
    assert refusal(quotas, "alice", "10.0.0.1") is None
    assert refusal(quotas, "alice", "10.0.0.1") is None
    assert refusal(quotas, "alice", "10.0.0.2") is Refusal.USER_CALL_LIMIT
    assert refusal(quotas, "bob", "10.0.0.1") is None
    assert refusal(quotas, "carol", "10.0.0.1") is Refusal.ADDRESS_CALL_LIMIT
    assert refusal(quotas, "carol", "10.0.0.3") is None
    assert refusal(quotas, "dave", "10.0.0.4") is Refusal.GATEWAY_CALL_LIMIT
    for user, address in [("alice", "10.0.0.1")] * 2 + [("bob", "10.0.0.1"), ("carol", "10.0.0.3")]:
        quotas.release(user, address)
    assert quotas.snapshot() == {"calls": 0, "users": 0, "addresses": 0}
    # Alice started 2 in this minute; 3 more (each ended) reach her 5.
    for _ in range(3):
        assert refusal(quotas, "alice", "10.0.0.9") is None
        quotas.release("alice", "10.0.0.9")
    assert refusal(quotas, "alice", "10.0.0.9") is Refusal.USER_CALL_RATE
    # 10.0.0.1 started 3 (alice twice, bob): 3 more by others reach its 6.
    for user in ("erin", "frank", "grace"):
        assert refusal(quotas, user, "10.0.0.1") is None
        quotas.release(user, "10.0.0.1")
    assert refusal(quotas, "heidi", "10.0.0.1") is Refusal.ADDRESS_CALL_RATE
    clock.now += 60.0
    assert refusal(quotas, "alice", "10.0.0.1") is None
    quotas.release("alice", "10.0.0.1")
    assert quotas.snapshot() == {"calls": 0, "users": 0, "addresses": 0}


def test_a_call_turned_away_after_admission_does_not_use_the_minute():
    quotas = CallQuotas(QuotaLimits(per_minute_per_user=1), Clock())
    quotas.admit("alice", "10.0.0.1")  # e.g. then refused: no worker free
    quotas.release("alice", "10.0.0.1")
    assert refusal(quotas, "alice", "10.0.0.1") is None
    quotas.release("alice", "10.0.0.1")
    assert refusal(quotas, "alice", "10.0.0.1") is Refusal.USER_CALL_RATE


def test_no_user_without_a_token_and_zero_turns_a_limit_off():
    quotas = CallQuotas(QuotaLimits(calls_per_user=1))
    for _ in range(10):
        quotas.admit(None, "127.0.0.1")
    assert quotas.live_total == 10 and not quotas.live_by_user


@pytest.mark.parametrize("n", [2000])
def test_old_minutes_are_forgotten(n):
    clock = Clock()
    quotas = CallQuotas(QuotaLimits(per_minute_per_ip=5), clock)
    for i in range(n):
        quotas.admit(None, f"10.{i // 256}.{i % 256}.1")
        quotas.started(None, f"10.{i // 256}.{i % 256}.1")
        quotas.release(None, f"10.{i // 256}.{i % 256}.1")
        clock.now += 0.1
    assert len(quotas._ip_minutes) <= 1024 + 600
