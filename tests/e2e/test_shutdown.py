"""Gateway shutdown ends every call on both legs: BYE to the phone, hangup 503 to the browser."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from peers.gateway import free_port, make_config, start_gateway, stop_gateway
from peers.sipp import SippPhone
from peers.webclient import WebClient

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize(
    ("signum", "group"),
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGTERM, True)],
    ids=["SIGINT", "SIGTERM", "SIGTERM-process-group"],
)
async def test_shutdown_hangs_up_both_legs(tmp_path, signum, group):
    """``group``: the signal reaches every process at once, as systemd sends it."""
    port = free_port()
    gateway = start_gateway(tmp_path, make_config(port, workers=1), http_port=port)
    try:
        await asyncio.to_thread(gateway.wait_ready, 60.0, 1)
        async with SippPhone("answer_wait_bye", tmp_path) as phone:
            client = WebClient(gateway.url)
            await client.connect()
            call = await client.establish("c1", f"sipp{phone.port}")
            await client.wait_event(call, "accepted")
            if group:  # the gateway runs in a session of its own: its pid is the group's
                os.killpg(gateway.process.pid, signum)
            else:
                gateway.process.send_signal(signum)
            hangup = await client.wait_event(call, "hangup", timeout=10)
            assert (hangup["code"], hangup["by"]) == (503, "gateway")
            await phone.wait_for(lambda r: r.byes == 1, timeout=5)
            exit_code = await asyncio.to_thread(gateway.process.wait, 15)
            assert exit_code == 0, gateway.log.read_text()[-2000:]
            log = gateway.log.read_text()
            assert " died " not in log and "restarting" not in log, log[-2000:]
            await client.close()
    finally:
        stop_gateway(gateway)
