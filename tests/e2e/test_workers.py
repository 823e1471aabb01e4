"""Worker processes: a dead worker ends its calls cleanly and is replaced."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from peers.webclient import WebClient

pytestmark = pytest.mark.timeout(90)


async def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.1)


async def test_killed_worker_hangs_up_its_calls_and_restarts(gateway):
    async with WebClient(gateway.url) as client:
        call = await client.establish("doomed", "echo")
        await client.wait_event(call, "accepted")
        before = gateway.health()
        assert before["calls_active"] >= 1
        # The call went to one worker; kill both workers' processes that hold calls
        # by killing each in turn until the call ends (the other keeps serving).
        pids = [p for p in before["worker_pids"] if p]
        victim = None
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            victim = pid
            try:
                hangup = await client.wait_event(call, "hangup", timeout=3)
                break
            except TimeoutError:
                continue
        else:
            pytest.fail("no worker held the call")
        assert hangup["code"] == 500
        assert hangup["by"] == "gateway"
        assert "worker" in hangup["reason"]
        # The pool restarts the dead worker; the gateway takes calls again.
        await wait_for(lambda: gateway.health()["workers_ready"] == 2, 30)
        assert victim not in gateway.health()["worker_pids"]
        call2 = await client.establish("after", "echo")
        await client.wait_event(call2, "accepted")
        await asyncio.sleep(2)
        tone = call2.measure(1.0)
        assert abs(tone.hz - 1000) <= 10, tone
        await client.hangup("after")
    assert "sipgw_worker_deaths_total 1" in gateway.metrics()
