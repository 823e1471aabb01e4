"""The sliding-window rate limit, and the worker pool's set-up pacing built on it."""

from __future__ import annotations

import pytest

from gateway.front.pool import WorkerHandle, WorkerPool
from gateway.limits import SlidingWindow
from gateway.outcomes import Refusal, Refused


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_sliding_window_counts_only_the_last_interval():
    clock = Clock()
    window = SlidingWindow(3, 1.0, clock)
    assert [window.add() for _ in range(4)] == [True, True, True, False]
    assert window.full()
    clock.now += 0.999
    assert not window.add()
    clock.now += 0.001
    assert window.add() and window.add() and window.add() and not window.add()


def ready_pool(clock: Clock, setups: int) -> WorkerPool:
    pool = WorkerPool([], lambda w, m: None, lambda w: None, max_setups_per_second=setups)
    pool.workers = [
        WorkerHandle(i, 4, ready=True, setups=SlidingWindow(setups, 1.0, clock)) for i in range(2)
    ]
    return pool


def test_pool_spreads_calls_and_paces_set_ups_per_worker():
    clock = Clock()
    pool = ready_pool(clock, 3)
    taken = []
    for key in range(6):
        worker = pool.acquire(key)
        taken.append(worker.index)
        pool.release(worker, key)  # churn: each call ends at once
    assert sorted(taken) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(Refused) as refused:
        pool.acquire(99)
    assert refused.value.refusal is Refusal.SETUP_RATE
    clock.now += 1.0
    assert pool.acquire(100).index in (0, 1)


def test_pool_full_and_not_ready():
    clock = Clock()
    pool = ready_pool(clock, 40)
    for key in range(8):
        pool.acquire(key)
    with pytest.raises(Refused) as refused:
        pool.acquire(8)
    assert refused.value.refusal is Refusal.NO_CAPACITY
    for worker in pool.workers:
        worker.ready = False
    with pytest.raises(Refused) as refused:
        pool.acquire(9)
    assert refused.value.refusal is Refusal.NO_WORKER
