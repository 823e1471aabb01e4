"""Worker processes: a dead worker ends its calls cleanly and is replaced."""

from __future__ import annotations

import asyncio
import os
import re
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
        # The call went to one worker: kill that one first (the log names it), then
        # the others in turn should the call still be up (the rest keep serving).
        placed = re.findall(r"\(doomed\) to \S+ on worker (\d+)", gateway.log.read_text())
        pids_before = gateway.pids()
        pids = [p for p in pids_before if p]
        if placed:
            holder = pids_before[int(placed[-1])]
            pids.sort(key=lambda pid: pid != holder)
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
        assert victim not in gateway.pids()
        call2 = await client.establish("after", "echo")
        await client.wait_event(call2, "accepted", timeout=15)
        # Possibly the restarted worker's first call: allow for its start-up.
        tone = await call2.wait_for_tone(1000)
        assert abs(tone.hz - 1000) <= 10, tone
        await client.hangup("after")
    assert "sipgw_worker_deaths_total 1" in gateway.metrics()


def open_fds_and_threads(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


async def test_calls_leave_no_fd_thread_or_slot_behind(gateway):
    """Six calls placed, answered and hung up (three by BYE, three while setting up):
    every worker ends with the file descriptors and threads it had (its encode
    pool, one thread per call slot, is started with the worker) and no call."""
    await wait_for(lambda: gateway.health()["calls_active"] == 0, 10)
    # Warm-up: whatever a worker creates once, on its first call, is not a leak.
    # Two connections at once, so each worker takes one (a connection's calls
    # share a worker where they can).
    async with WebClient(gateway.url) as one, WebClient(gateway.url) as two:
        calls = [(one, await one.establish("warm0", "echo"))]
        calls.append((two, await two.establish("warm1", "echo")))
        for client, call in calls:
            await client.wait_event(call, "accepted")
        for client, call in calls:
            await client.hangup(call.call_id)
            await client.close_calls()
    await wait_for(lambda: gateway.health()["calls_active"] == 0, 10)
    await asyncio.sleep(2.0)
    pids = [p for p in gateway.pids() if p]
    before = {pid: open_fds_and_threads(pid) for pid in pids}
    async with WebClient(gateway.url) as client:
        for i in range(3):
            call = await client.establish(f"up{i}", "echo")
            await client.wait_event(call, "accepted")
            await asyncio.sleep(0.5)
            await client.hangup(f"up{i}")
        for i in range(3):  # hung up right after the answer, before the SIP leg settles
            await client.establish(f"early{i}", "tone")
            await client.hangup(f"early{i}")
        await client.close_calls()
    await wait_for(lambda: gateway.health()["calls_active"] == 0, 10)
    await asyncio.sleep(2.0)  # let pjsua2 and aiortc finish closing sockets
    after = {pid: open_fds_and_threads(pid) for pid in pids}
    for pid in pids:
        assert after[pid] == before[pid], (pid, before, after)
