"""A thousand calls in a row leak no memory and no call.

1000 calls of one second of audio each, at most 8 at a time (the gateway's 2 x 4
slots), to one sipp phone in ``echo`` mode. Every call must be answered, carry
audio, and end with the ``hangup`` reply to the browser's hang-up. ``busy``
refusals (set-up pacing, or a slot pjsua has not freed yet) are retried and
counted, not failures. The RSS of every gateway process (front, workers, embedded
targets) is sampled after call 100 and after call 1000, each time with no call
live, and may grow by less than 20 MB.

The gateway is this test's own, with the test config's limits
(``http.max_call_rate`` 50 per connection, ``workers.max_setups_per_second`` 20),
so the session gateway's other calls do not blur the figures. ``bench/volume.py``
prints the same figures at 100, 500 and 1000 calls.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest
from peers.gateway import free_port, make_config, start_gateway, stop_gateway
from peers.sipp import SippPhone
from peers.volume import rss_table, run_volume

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CALLS = 1000
CONCURRENCY = 8
FIRST_SAMPLE = 100
MAX_GROWTH_KB = 20 * 1024


async def test_a_thousand_calls_leak_neither_memory_nor_calls(tmp_path):
    port = free_port()
    gateway = start_gateway(tmp_path, make_config(port), http_port=port)
    try:
        await asyncio.to_thread(gateway.wait_ready, 90.0)
        pids_before = gateway.pids(), gateway.pids("targets")
        started = time.monotonic()
        async with SippPhone("echo", tmp_path, calls=CONCURRENCY, max_lifetime_s=1500) as phone:
            result = await run_volume(
                gateway,
                f"sipp{phone.port}",
                calls=CALLS,
                concurrency=CONCURRENCY,
                audio_seconds=1.0,
                checkpoints=(FIRST_SAMPLE, CALLS),
            )
            report = await phone.wait_for(
                lambda r: r.byes >= result.completed, timeout=30, interval=0.5
            )
        elapsed = time.monotonic() - started
        after = gateway.health()
        pids_after = gateway.pids(), gateway.pids("targets")
        metrics = gateway.metrics()
    finally:
        stop_gateway(gateway)

    print(
        f"\n{result.completed}/{CALLS} calls in {elapsed:.0f} s "
        f"({result.calls_per_second:.2f} calls/s while calling), "
        f"{result.busy_total} busy refusals retried {dict(result.busy)}, "
        f"set-up median {statistics.median(result.setup_seconds or [0]) * 1000:.0f} ms, "
        f"{len(result.wrong_tone)} calls without their tone back"
    )
    print("\n".join(rss_table(result)))

    assert not result.failures, f"{len(result.failures)} calls failed: {result.failures[:20]}"
    assert result.completed == CALLS
    # Each answered call reached the phone once and got its BYE; refusals sent nothing.
    assert report.invites == CALLS and report.byes == CALLS, report
    # Audio flowed on every call; a handful of calls may lose their echo to a
    # CPU stall on this shared 2-core machine, crossed or dead audio would be many.
    assert len(result.wrong_tone) <= CALLS // 100, result.wrong_tone
    # No process restarted, and nothing is left live.
    assert pids_after == pids_before, (pids_before, pids_after)
    assert after["calls_active"] == 0 and after["call_slots_free"] == CONCURRENCY, after
    assert "sipgw_calls_active 0.0" in metrics

    first, last = result.rss[FIRST_SAMPLE], result.rss[CALLS]
    assert set(first) == set(last), (first, last)
    for role, (pid, kb) in first.items():
        assert last[role][0] == pid, f"{role} is a new process"
        growth = last[role][1] - kb
        assert growth < MAX_GROWTH_KB, f"{role} grew {growth / 1024:.1f} MB from call 100 to 1000"
